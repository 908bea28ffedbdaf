"""Where DPS meets the WebUI's sampler. Host-free: every host object arrives as an argument, so the
tests drive these with fakes of the host contracts (``tests/fakes/webui_host.py``, after AUTOMATIC1111 @82a973c
``modules/sd_samplers_cfg_denoiser.py`` and Forge @dfdcbab).

* AUTOMATIC1111: ``DenoiserWrapper`` replaces ``forward`` on the sampler's CFG-denoiser *instance*
  (``p.sampler.model_wrap_cfg``), the shape of k-diffusion's ``make_cond_model_fn``: the host samples
  under ``torch.no_grad``; the wrapper re-enables grad on a copy of x, runs the host's own forward (UNet,
  CFG, mask blend) and the VAE's decoder module, and returns the corrected prediction, detached.
* Forge: ``post_cfg_function`` is a ``sampler_post_cfg_function`` for a cloned UNet patcher. Forge
  samples under ``torch.inference_mode`` with inference-tensor weights, so the gradient is taken with
  respect to x̂0 only (mode "x0_only") through ``autograd_copy`` of the VAE decoder.

Errors inside a sampling step never reach the host: the step is returned unguided, guidance is switched
off for the rest of the job, and the message is kept for the console and the infotext (``Job``).
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch

from dps.autograd_safe import autograd_copy
from dps.guidance import DPSGuidance
from dps.host import eps_correction, final_refinement, guided_correction, is_last_step, schedule_step
from dps.progress import sigma_progress
from dps.samplers import CorrectionFilter, StageClock, sampler_family, stage_clock
from dps.vae_gradient import DecoderGradient

Log = Callable[[str], None]


def console(message: str) -> None:
    print(f"[DPS Guidance] {message}", file=sys.stderr)


@dataclass
class Job:
    """Per-generation state shared by the script and its hooks: notes and the first error for the
    infotext, and the last measured distance per sample (for the console summary)."""

    notes: list[str] = field(default_factory=list)
    error: str | None = None
    guided_calls: int = 0
    skipped_calls: int = 0
    first_distance: torch.Tensor | None = None
    last_distance: torch.Tensor | None = None
    refined: list[torch.Tensor] = field(default_factory=list)   # the residual after the last step's refinement
    log: Log = console
    told: set[str] = field(default_factory=set)

    def tell(self, message: str) -> None:
        """Say ``message`` on the console once per job, without writing it into the image's infotext."""
        if message not in self.told:
            self.told.add(message)
            self.log(message)

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            self.log(message)

    def fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = f"{type(exc).__name__}: {exc}"
            self.log(f"guidance switched off for the rest of this job after an error: {self.error}")

    def record(self, distance: torch.Tensor, skipped: bool) -> None:
        self.guided_calls += 1
        self.skipped_calls += int(skipped)
        if self.first_distance is None:
            self.first_distance = distance.detach().cpu()
        self.last_distance = distance.detach().cpu()


class SigmaClock:
    """Sampling progress (0 at the first call, 1 at the end) and the step's σ decrease, from the noise
    level the denoiser is called with.

    ``kind="sigma"`` (k-diffusion): progress in log σ from the first σ seen to the smallest positive σ of
    ``schedule`` (or ``sigma_min``). ``kind="timestep"`` (DDIM, PLMS, UniPC: "sigma" is the timestep t):
    progress linear in t down to 0. ``schedule`` (descending σs, as ``get_sigmas`` returns them) also
    gives Δσ to the next σ, which the Euler-calibrated rules need; without it Δσ is None.

    ``sampler`` (the host's k-diffusion sampler: its ``func``, ``eta`` and ``config.options``) lets ``feed`` pass
    the correction through the sampler family's filter (``dps.samplers``: written out, or probed from the
    function), so that a multistep sampler's update receives the intended step, as the ComfyUI node does.
    """

    def __init__(self, kind: str = "sigma", schedule: torch.Tensor | None = None,
                 sigma_min: float | None = None, sampler: object | None = None, log: Log | None = None) -> None:
        if kind not in ("sigma", "timestep"):
            raise ValueError(f"kind must be 'sigma' or 'timestep', got {kind!r}")
        self.kind = kind
        self.schedule: list[float] | None = None
        self.sigma_min = sigma_min
        self.top: float | None = None
        self.last_t: float | None = None
        self.sampler = sampler
        self.log = log
        self.filter: CorrectionFilter | None | bool = None     # False: decided, none
        self.stages: StageClock | None | bool = None            # False: decided, none
        if schedule is not None:
            self.set_schedule(schedule)

    def set_schedule(self, schedule: torch.Tensor) -> None:
        self.schedule = sorted((float(s) for s in torch.as_tensor(schedule).flatten()), reverse=True)
        self.top = None
        self.filter = None
        self.stages = None

    def feed(self, sigma: float, correction: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
        """The correction to add to the prediction ``denoised`` at ``sigma``: filtered for a multistep sampler,
        else as is (for a sampler with several evaluations per step: kept for the last, ``held``)."""
        if self.filter is None:
            try:
                self.filter = self._make_filter() or False
            except (TypeError, ValueError):   # an unusual sampler: the correction as is, as before the filter
                self.filter = False
        fed = self.filter(sigma, correction, denoised) if self.filter else correction
        return self.stages.first_feed(fed) if self.stages else fed

    def held(self, sigma: float) -> torch.Tensor | None:
        """For a sampler with several evaluations per step (Heun, DPM2, DPM fast: ``dps.samplers.StageClock``),
        what a later evaluation of the step adds when the call at ``sigma`` is one, else None; call once per
        denoiser call, in order."""
        if self.stages is None:
            func = getattr(self.sampler, "func", None)
            usable = self.kind == "sigma" and callable(func) and bool(self.schedule)
            self.stages = (stage_clock(func, self.schedule, sampler_options(self.sampler, func)) if usable
                           else None) or False
        if not self.stages:
            return None
        return self.stages.later_feed(sigma) if self.stages.later_stage(sigma) else None

    def _make_filter(self) -> CorrectionFilter | None:
        """The filter for the levels the sampler runs: the schedule from the first σ seen down (img2img samples
        the tail of ``get_sigmas``); None for a single-step, timestep or unreadable sampler."""
        func = getattr(self.sampler, "func", None)
        if self.kind != "sigma" or not callable(func) or not self.schedule or self.top is None:
            return None
        levels = [s for s in self.schedule if s <= self.top * (1 + 1e-5)]
        if len(levels) < 3:
            return None
        family = sampler_family(func, torch.tensor(levels, dtype=torch.float64), sampler_options(self.sampler, func))
        if family is None or family.history == 0:
            return None
        filt = CorrectionFilter(family, levels)
        if self.log is not None:
            far = filt.far_steps()
            self.log(f"sampler {getattr(func, '__name__', '')}: the correction is fed through its multistep weights "
                     f"({len(levels) - 1} levels, {family.history} earlier predictions"
                     + (f"; {len(far)} of them extrapolate far and are taken at first order when guided)" if far
                        else ")"))
        return filt

    def reset(self) -> None:
        self.top = None
        self.last_t = None
        self.stages = None

    def observe(self, sigma: float) -> tuple[float, float | None]:
        if self.top is None or sigma > self.top:
            self.top = sigma
        if self.kind == "timestep":
            # DDIM/PLMS/UniPC call the denoiser once per step on an evenly spaced grid of t: the last
            # decrease of t predicts the next one (None at the first call).
            last, self.last_t = self.last_t, sigma
            delta_t = last - sigma if last is not None and last > sigma else None
            return (self.top - sigma) / self.top if self.top > 0 else 1.0, delta_t
        positive = [s for s in (self.schedule or []) if s > 0]
        bottom = min(positive) if positive else self.sigma_min
        delta = schedule_step(sigma, torch.tensor(self.schedule), self.stages or None) if self.schedule else None
        return sigma_progress(sigma, self.top, bottom), delta


def sampler_options(sampler: object, func: Callable) -> dict:
    """The options the WebUI passes to its k-diffusion function that change a family's weights: ``eta``
    (``KDiffusionSampler.eta``, set when sampling starts) and ``solver_type`` (the sampler config's options),
    those the function takes."""
    import inspect
    try:
        parameters = inspect.signature(func).parameters
    except (TypeError, ValueError):
        return {}
    options = dict(getattr(getattr(sampler, "config", None), "options", None) or {})
    eta = getattr(sampler, "eta", None)
    if isinstance(eta, (int, float)):
        options["eta"] = float(eta)
    return {k: v for k, v in options.items() if k in parameters}


def _detach_attr(obj, name: str) -> None:
    value = getattr(obj, name, None)
    if isinstance(value, torch.Tensor) and value.requires_grad:
        setattr(obj, name, value.detach())


class DenoiserWrapper:
    """Instance-level replacement of ``CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale,
    s_min_uncond, image_cond)`` (A1111). Install with ``install``; a second install on the same denoiser
    updates the existing wrapper (img2img reuses its sampler; hires fix calls the hook again)."""

    def __init__(self, denoiser, guidance: DPSGuidance, job: Job, clock: SigmaClock,
                 after_call: Callable[[], None] | None = None) -> None:
        self.denoiser = denoiser
        self.guidance = guidance
        self.job = job
        self.clock = clock
        self.after_call = after_call
        self.enabled = True
        self.previous = denoiser.__dict__.get("forward")  # an instance-level forward someone set before us
        self.timesteps = getattr(denoiser, "alphas", None) is not None  # CFGDenoiserTimesteps returns eps
        if self.timesteps:
            clock.kind = "timestep"

    @classmethod
    def install(cls, denoiser, guidance: DPSGuidance, job: Job, clock: SigmaClock,
                after_call: Callable[[], None] | None = None) -> "DenoiserWrapper":
        current = denoiser.__dict__.get("forward")
        if isinstance(current, cls):
            current.guidance, current.job, current.clock, current.after_call = guidance, job, clock, after_call
            if current.timesteps:
                clock.kind = "timestep"
            current.enabled = True
            return current
        wrapper = cls(denoiser, guidance, job, clock, after_call)
        denoiser.forward = wrapper
        return wrapper

    @staticmethod
    def uninstall(denoiser) -> None:
        current = denoiser.__dict__.get("forward")
        if isinstance(current, DenoiserWrapper):
            if current.previous is None:
                del denoiser.__dict__["forward"]
            else:
                denoiser.forward = current.previous

    def original(self, *args, **kwargs):
        if self.previous is not None:
            return self.previous(*args, **kwargs)
        return type(self.denoiser).forward(self.denoiser, *args, **kwargs)

    def __call__(self, x, sigma, *args, **kwargs):
        s = float(torch.as_tensor(sigma).flatten()[0])
        held = self.clock.held(s)
        progress, delta = self.clock.observe(s)
        if held is not None and self.enabled and not self.timesteps:   # a later stage: the step's correction
            with torch.no_grad():
                out = self.original(x, sigma, *args, **kwargs)
            return out + held.to(out)
        if not self.enabled or s <= 0 or not self.guidance.active(progress):
            return self.original(x, sigma, *args, **kwargs)
        holder: dict = {}
        try:
            return self._guided(x, sigma, s, delta, holder, args, kwargs)
        except Exception as exc:  # never BaseException: the host's InterruptedException must pass
            self.enabled = False
            self.job.fail(exc)
            self._clean_side_outputs()
            if "out" in holder:
                return holder["out"].detach()
            with torch.no_grad():
                return self.original(x, sigma, *args, **kwargs)

    def _guided(self, x, sigma, s, delta, holder, args, kwargs):
        def x0_fn(x_):
            out = self.original(x_, sigma, *args, **kwargs)
            holder["out"] = out
            return self.denoiser.get_pred_x0(x_, out, sigma) if self.timesteps else out

        result = self.guidance.evaluate(x, x0_fn)
        for note in self.guidance.notes:   # e.g. the fall-back to x0_only after running out of memory
            self.job.note(note)
        recompute = self.guidance.denoiser_recompute
        if recompute is not None and recompute.planned and self.guidance.mode == "full":
            self.job.tell(f"gradient through the UNet: {recompute.reason}")
        self._clean_side_outputs()
        out = holder["out"].detach()
        self.job.record(result.distance, result.skipped)
        if self.timesteps:
            alphas = self.denoiser.alphas
            t = int(round(s))
            t_next = None if delta is None else t - int(round(delta))
            next_ac = None if t_next is None else (1.0 if t_next < 0 else float(alphas[t_next]))
            guided = out + eps_correction(self.guidance, result, x, float(alphas[t]), next_ac).to(out.dtype)
        else:
            correction = self.clock.feed(s, guided_correction(result, self.guidance, s, delta, x), result.x0_hat)
            guided = result.x0_hat + correction                 # result.x0_hat is out
            if is_last_step(s, delta):                          # the sample itself: brought to the noise floor
                guided = final_refinement(self.guidance, guided, distances=self.job.refined)
        self._feed_unconditional(guided - out)
        return guided.to(out.dtype)

    def _feed_unconditional(self, change: torch.Tensor) -> None:
        """DDIM CFG++ reads the unconditional output the host keeps (``last_noise_uncond``, in the forward's units)
        beside the guided one: it gets the same change, so that its update receives the correction as DDIM's
        does (``dps.samplers``, CFG++)."""
        if getattr(self.denoiser, "need_last_noise_uncond", False):
            kept = getattr(self.denoiser, "last_noise_uncond", None)
            if isinstance(kept, torch.Tensor):
                self.denoiser.last_noise_uncond = kept.detach() + change.to(kept)

    def _clean_side_outputs(self) -> None:
        # The host keeps the cond x̂0 for interrupts and the live preview; a graph there would leak into
        # the preview thread (``.numpy()`` on a grad tensor) and keep the UNet graph alive.
        _detach_attr(getattr(self.denoiser, "sampler", None), "last_latent")
        if self.after_call is not None:
            self.after_call()


def vae_gradient(get_model: Callable[[], object], mode: str = "auto") -> DecoderGradient:
    """The differentiable decode for AUTOMATIC1111: latent -> image in [-1, 1] through the VAE's own module
    (ldm/sgm ``first_stage_model.decode``; the host's ``decode_first_stage`` is ``@torch.no_grad``), with the
    gradient taken as ``mode`` says (``dps.vae_gradient``). The model (latent scale, SD3 format) is fetched per
    call because the SDXL refiner swaps it mid-run; both share one latent space."""

    def call(first_stage: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        model = get_model()
        first = next(iter(first_stage.parameters()), None)
        if getattr(model, "is_sd3", False) and hasattr(model, "latent_format"):
            z = model.latent_format.process_out(z)
        else:
            z = z / model.scale_factor
        if first is not None:
            z = z.to(device=first.device, dtype=first.dtype)
        return first_stage.decode(z)

    return DecoderGradient(get_model().first_stage_model, call, mode=mode)


_AUTOGRAD_COPIES: "weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module]" = weakref.WeakKeyDictionary()


def forge_gradient(vae_patcher, mode: str = "auto") -> DecoderGradient:
    """The differentiable decode for Forge: ``first_stage_model.decode(process_out(z))`` on an autograd copy,
    made once per decoder module (Forge clones its patchers per job but shares the module) and moved to the
    latent's device on first use; the gradient taken as ``mode`` says (``dps.vae_gradient``)."""
    source = vae_patcher.first_stage_model
    module = _AUTOGRAD_COPIES.get(source)
    if module is None:
        module = _AUTOGRAD_COPIES[source] = autograd_copy(source)

    def call(first_stage: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        first = next(iter(module.parameters()), None)
        if first is not None and first.device != z.device:
            module.to(z.device)   # in place: views of ``module`` share its parameters
            first = next(iter(module.parameters()))
        z = module.process_out(z) if hasattr(module, "process_out") else z
        if first is not None:
            z = z.to(first.dtype)
        return first_stage.decode(z)

    return DecoderGradient(module, call, mode=mode)


def _move_unconditional_in_place(sampler: object, args: dict, change: torch.Tensor) -> None:
    """Forge's DDIM CFG++ reads ``last_noise_uncond``, which Forge's CFG denoiser computes from this very
    unconditional prediction after the post-CFG functions have run: it gets the guided one's change, in place (Forge
    gives no later hook), so that the update receives the correction as DDIM's does (``dps.samplers``, CFG++).
    Only for a sampler that reads it (``need_last_noise_uncond``)."""
    unconditional = args.get("uncond_denoised")
    if getattr(getattr(sampler, "model_wrap_cfg", None), "need_last_noise_uncond", False) \
            and isinstance(unconditional, torch.Tensor):
        unconditional.add_(change.to(unconditional))


def post_cfg_function(guidance: DPSGuidance, job: Job, clock: SigmaClock) -> Callable[[dict], torch.Tensor]:
    """A Forge/ComfyUI ``sampler_post_cfg_function``: ``args`` holds ``input`` (x), ``sigma`` and
    ``denoised`` (x̂0 after CFG); returns the guided x̂0. Mode "x0_only" (the gradient w.r.t. x̂0)."""
    if guidance.mode != "x0_only":
        raise ValueError("the post-CFG hook differentiates with respect to x0_hat only; build the guidance "
                         "with mode='x0_only'")
    state = {"enabled": True}

    def dps_post_cfg(args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        s = float(torch.as_tensor(args["sigma"]).flatten()[0])
        held = clock.held(s)
        progress, delta = clock.observe(s)
        if held is not None and state["enabled"]:                  # a later stage: the step's correction
            return (denoised + held.to(denoised)).to(dtype=denoised.dtype)
        if not state["enabled"] or s <= 0 or not guidance.active(progress):
            return denoised
        try:
            x = args["input"]
            result = guidance.evaluate(x, lambda _x: denoised)
            for note in guidance.notes:
                job.note(note)
            job.record(result.distance, result.skipped)
            guided = result.x0_hat + clock.feed(s, guided_correction(result, guidance, s, delta, x), result.x0_hat)
            if is_last_step(s, delta):
                guided = final_refinement(guidance, guided, distances=job.refined)
            _move_unconditional_in_place(clock.sampler, args, guided - denoised)
            return guided.to(device=denoised.device, dtype=denoised.dtype)
        except Exception as exc:  # never BaseException (interrupts)
            state["enabled"] = False
            job.fail(exc)
            return denoised

    dps_post_cfg.dps_guidance = True  # marks ours, so re-hooking replaces instead of stacking
    return dps_post_cfg
