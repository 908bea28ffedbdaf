"""The ComfyUI side of DPS guidance: two model wrappers on a cloned MODEL, and the node's checks.

Host-free on purpose (no ``comfy`` import): ComfyUI's objects arrive as arguments and are used through the
documented surface only, so tests drive this module with small fakes.

* ``OUTER_SAMPLE`` wrapper (``fn(executor, noise, latent_image, sampler, sigmas, denoise_mask, callback,
  disable_pbar, seed)``): checks the latent against the measurement and the operator before the first
  step, and holds the per-run state.
* ``PREDICT_NOISE`` wrapper (``fn(executor, x, timestep, model_options, seed)``, ``timestep`` is σ): the
  one model evaluation a sampler asks for (CFG, ControlNet and LoRA included) is re-run with grad on a copy
  of ``x``; ``x0_hat`` is what the host returns, the decode undoes the latent format
  (``inner_model.process_latent_out``) and runs the VAE's own module; the guided denoised is
  ``x0_hat + correction`` (``dps.host.guided_correction``). Every built-in sampler goes through it. For a
  multistep sampler (DPM++ 2M, 2M SDE, 3M SDE; told by the ``KSAMPLER``'s function, which ``OUTER_SAMPLE``
  receives) the correction is filtered (``dps.samplers``) so that its update receives the intended step; a
  sampler without a family there keeps the plain correction, said once in the log. A CFG++ sampler reads the
  unconditional prediction through a ``sampler_post_cfg_function`` of its own; the guided evaluation runs without
  it, and it is then given the corrected predictions (``feed_post_cfg``), so that the correction reaches both
  branches and the x-update receives it as the base sampler's does (``dps.samplers``).

The gradient through the decoder is taken by ``dps.vae_gradient`` (``vae_gradient``: auto picks full,
checkpointed or tiled from the free memory); with a fast decoder (TAESD) and ``fast_decoder_end`` < 1 the fast
decoder guides the noisy part of the schedule and the real VAE the rest. The gradient through the model
(``gradient: full``) recomputes the activations of the ``diffusion_model``'s blocks where keeping them would not
fit (``dps.recompute``, ``Settings.denoiser_gradient``, auto by default).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import nn

from ..dps.guidance import MODES, RULES, DPSGuidance
from ..dps.recompute import DENOISER_GRADIENTS, BlockRecompute
from ..dps.vae_gradient import VAE_GRADIENTS, DecoderGradient
from ..dps.proximal import sampler_note
from ..dps.host import HOST_RULE as DEFAULT_RULE
from ..dps.host import HOST_ZETA as DEFAULT_ZETA
from ..dps.samplers import CorrectionFilter, ProbedFamily, StageClock, sampler_family, stage_clock
from ..dps.host import (final_refinement, final_stage_refinement, guided_correction, image_to_nchw, is_last_step,
                        make_autograd_safe, match_channels, needs_autograd_fix, normal_tensor, schedule_step)
from ..dps.noise import NoiseModel
from ..dps.operators import Compose, Inpainting, Operator

PREDICT_NOISE = "predict_noise"   # comfy.patcher_extension.WrappersMP.PREDICT_NOISE
OUTER_SAMPLE = "outer_sample"     # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
KEY = "dps"
PRECISIONS = ("auto", "fp32")

log = logging.getLogger("dps_guidance")


@dataclass
class Settings:
    """The Apply node's options (see the node's tooltips)."""

    zeta: float = DEFAULT_ZETA
    rule: str = DEFAULT_RULE
    mode: str = "full"
    start_percent: float = 0.0
    end_percent: float = 1.0
    precision: str = "auto"
    on_nonfinite: str = "raise"
    vae_gradient: str = "auto"
    vae_tile: int = 0                        # image pixels per tile side for vae_gradient "tiled"; 0 = automatic
    fast_decoder_end: float = 1.0
    memory_budget: float | None = None       # bytes the gradient's activations may use (VAE and model); None:
                                             # half the free memory (dps.vae_gradient.free_memory)
    denoiser_gradient: str = "auto"          # dps.recompute: which UNet/DiT blocks recompute in gradient "full"

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"step rule must be one of {RULES}, got {self.rule!r}")
        if self.mode not in MODES:
            raise ValueError(f"gradient mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"VAE decode precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.vae_gradient not in VAE_GRADIENTS:
            raise ValueError(f"vae_gradient must be one of {VAE_GRADIENTS}, got {self.vae_gradient!r}")
        if self.denoiser_gradient not in DENOISER_GRADIENTS:
            raise ValueError(f"denoiser_gradient must be one of {DENOISER_GRADIENTS}, got {self.denoiser_gradient!r}")
        if self.vae_tile < 0:
            raise ValueError(f"vae_tile must be 0 (automatic) or a tile side in pixels, got {self.vae_tile}")
        if not 0.0 <= self.fast_decoder_end <= 1.0:
            raise ValueError(f"fast_decoder_end must be between 0 and 1, got {self.fast_decoder_end}")
        if not 0.0 <= self.start_percent <= self.end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {self.start_percent} and "
                             f"{self.end_percent}; swap them or move start_percent down")


@dataclass
class RunState:
    """Per-sampling-run state: the guidance through the real VAE and through the fast decoder (either may be
    None), the float32 decoder copy, the residuals seen and the VAE gradient plans that were logged."""

    guidance: DPSGuidance | None = None
    fast_guidance: DPSGuidance | None = None
    decoder_copy: nn.Module | None = None
    distances: list[torch.Tensor] = field(default_factory=list)
    refined: list[torch.Tensor] = field(default_factory=list)    # the residual after the last step's refinement
    logged: set = field(default_factory=set)
    sampler_filter: CorrectionFilter | None = None
    stages: StageClock | None = None
    host_post_cfg: tuple = ()    # the guider's own post-CFG functions: the others the sampler added (CFG++)


def _operators(op: Operator) -> list[Operator]:
    return [leaf for part in op.ops for leaf in _operators(part)] if isinstance(op, Compose) else [op]


def latent_channels_of(model: Any) -> int | None:
    fmt = model.get_model_object("latent_format")
    return getattr(fmt, "latent_channels", None)


def check_inputs(model: Any, vae: Any, measurement: torch.Tensor, operator: Any, noise: Any,
                 surrogate: nn.Module | None, uses_vae: bool = True) -> None:
    """Node-time checks that need no latent: types, video models, latent channels, the inpainting mask.
    ``uses_vae``: the VAE decodes for guidance too (no fast decoder, or one that hands over before the end)."""
    if not isinstance(operator, Operator):
        raise ValueError("operator must come from a DPS operator node (DPS Super-Resolution, DPS Inpainting, ...)")
    if not isinstance(noise, NoiseModel):
        raise ValueError("noise must come from a DPS noise node (DPS Gaussian Noise or DPS Poisson Noise)")
    if not isinstance(measurement, torch.Tensor) or measurement.ndim != 4 or measurement.shape[-1] < 3:
        raise ValueError("measurement must be an IMAGE (batch, height, width, 3); load it with Load Image")
    if not torch.isfinite(measurement).all():
        raise ValueError("the measurement image contains NaN or infinite values; reload or recreate it")
    fmt = model.get_model_object("latent_format")
    model_channels = getattr(fmt, "latent_channels", None)
    if getattr(fmt, "latent_dimensions", 2) != 2 or getattr(vae, "latent_dim", 2) != 2:
        raise ValueError("DPS guidance supports image models (SD1.5, SDXL, SD3, FLUX); this is a video or audio "
                         "model. Use an image checkpoint and its VAE")
    if surrogate is None or uses_vae:
        if vae is None:
            raise ValueError("DPS guidance needs the checkpoint's VAE (or a fast decoder used to the end: "
                             "fast_decoder_end = 1)")
        vae_channels = getattr(vae, "latent_channels", None)
        if model_channels is not None and vae_channels is not None and vae_channels != model_channels:
            raise ValueError(f"the VAE has {vae_channels} latent channels but the model uses {model_channels}; "
                             "connect the VAE that belongs to this checkpoint (SD1.5/SDXL: 4, SD3/FLUX: 16)")
        if not isinstance(getattr(vae, "downscale_ratio", 8), int):
            raise ValueError("this VAE is a video VAE; connect the image VAE of the checkpoint")
    if surrogate is not None:
        conv = next((m for m in surrogate.modules() if isinstance(m, nn.Conv2d)), None)
        if conv is not None and model_channels is not None and conv.in_channels != model_channels:
            raise ValueError(f"the TAESD decoder takes {conv.in_channels} latent channels but the model uses "
                             f"{model_channels}; pick the matching file (taesd: SD1.5, taesdxl: SDXL, "
                             "taesd3: SD3, taef1: FLUX)")
    for part in _operators(operator):
        if isinstance(part, Inpainting) and part is operator:
            mh, mw = part.mask.shape[-2:]
            h, w = measurement.shape[1:3]
            if (mh, mw) != (h, w):
                raise ValueError(f"the inpainting mask is {mw}x{mh} but the measurement image is {w}x{h}; "
                                 "use a mask of the measurement's size (resize it or draw it on that image)")
            if part.mask.shape[0] not in (1, measurement.shape[0]):
                raise ValueError(f"the mask batch ({part.mask.shape[0]}) must be 1 or the measurement batch "
                                 f"({measurement.shape[0]})")


class DPSPatch:
    """The wrappers of one Apply DPS Guidance node. Shared by the clones of its MODEL; state is per run."""

    def __init__(self, operator: Operator, noise: NoiseModel, measurement: torch.Tensor, settings: Settings,
                 vae: Any = None, surrogate: nn.Module | None = None,
                 interrupt: Callable[[], None] | None = None,
                 report: Callable[[str], None] | None = None) -> None:
        if vae is None and surrogate is None:
            raise ValueError("DPS guidance needs a VAE (or a TAESD decoder) to compare the sample with the measurement")
        self.operator = operator
        self.noise = noise
        self.measurement = image_to_nchw(normal_tensor(measurement))
        self.settings = settings
        self.vae = vae
        self.surrogate = surrogate
        self.interrupt = interrupt
        self.report = report
        self.run: RunState | None = None
        self.last_run: RunState | None = None
        self._inner: Any = None
        self._told: set = set()     # what the log has said once (sampler names, far-step counts)

    @property
    def uses_vae(self) -> bool:
        """Whether the real VAE decodes for guidance during some part of the schedule."""
        return self.surrogate is None or self.settings.fast_decoder_end < 1.0

    # ---- checks -------------------------------------------------------------------------------------
    def image_shape(self, latent_shape: torch.Size) -> tuple[int, int, int, int]:
        if len(latent_shape) != 4:
            raise ValueError(f"DPS guidance needs an image latent (batch, channels, height, width), got shape "
                             f"{tuple(latent_shape)}: video and audio latents are not supported")
        ratio = getattr(self.vae, "downscale_ratio", 8) if self.uses_vae else 8
        b, _, h, w = latent_shape
        return (int(b), 3, int(h) * ratio, int(w) * ratio)

    def validate(self, latent_shape: torch.Size, model_channels: int | None) -> torch.Tensor:
        """The measurement y fitted to the operator for this latent; ``ValueError`` naming the fix when the
        latent does not fit the measurement and operator."""
        image_shape = self.image_shape(latent_shape)
        if model_channels is not None and latent_shape[1] != model_channels:
            raise ValueError(f"the latent has {latent_shape[1]} channels but the model expects {model_channels}; "
                             "make the latent with this model's VAE or Empty Latent Image")
        y = match_channels(self.measurement, self.operator.measurement_shape(image_shape)[1])
        if y.shape[0] not in (1, image_shape[0]):
            raise ValueError(f"the measurement batch ({y.shape[0]}) must be 1 or the latent batch ({image_shape[0]})")
        try:
            self.operator.check_measurement(y, image_shape)
        except ValueError as err:
            raise ValueError(f"DPS: the measurement ({y.shape[-1]}x{y.shape[-2]}) does not fit a "
                             f"{image_shape[-1]}x{image_shape[-2]} image (latent {latent_shape[-1]}x"
                             f"{latent_shape[-2]}): {err}") from err
        return y

    # ---- wrappers -----------------------------------------------------------------------------------
    def outer_sample(self, executor: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        noise = args[0] if args else kwargs["noise"]
        guider = getattr(executor, "class_obj", None)
        patcher = getattr(guider, "model_patcher", None)
        y = self.validate(noise.shape, latent_channels_of(patcher) if patcher is not None else None)
        self.run = self._start_run(y, getattr(getattr(patcher, "model", None), "diffusion_model", None))
        self.run.host_post_cfg = tuple(post_cfg_functions(getattr(guider, "model_options", None)))
        sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        self.run.sampler_filter = self._sampler_filter(sampler, sigmas, patcher)
        function = getattr(sampler, "sampler_function", None)
        note = sampler_note(self.settings.rule, getattr(function, "__name__", None) or type(sampler).__name__)
        if note is not None and note not in self._told:
            self._told.add(note)
            log.warning("DPS: %s", note)
        if callable(function) and isinstance(sigmas, torch.Tensor):
            self.run.stages = stage_clock(function, sigmas, getattr(sampler, "extra_options", None) or {})
        try:
            return executor(*args, **kwargs)
        finally:
            self._finish_run()

    def predict_noise(self, executor: Callable[..., torch.Tensor], x: torch.Tensor, timestep: torch.Tensor,
                      model_options: dict, seed: Any) -> torch.Tensor:
        guider = executor.class_obj
        inner = guider.inner_model
        sigma = float(timestep.flatten()[0])
        stages = self.run.stages if self.run is not None else None
        if stages is not None and stages.later_stage(sigma, x):
            held = stages.later_feed(sigma)           # a step's later evaluation (Heun, DPM-2, DPM-Solver-fast)
            if held is not None:
                out = executor(x, timestep, model_options, seed)
                return self._refine_final(self._guidance_at(sigma, guider.inner_model), stages, sigma, x,
                                          out + held.to(out))
        if not self._active(sigma, inner, self.settings.start_percent, self.settings.end_percent):
            return executor(x, timestep, model_options, seed)
        if model_options.get("multigpu_clones"):
            raise ValueError("DPS guidance needs gradients, which multi-GPU sampling does not build; "
                             "remove the MultiGPU node or run on one GPU")
        if self.interrupt is not None:
            self.interrupt()
        if self.run is None:   # sampled without the OUTER_SAMPLE wrapper
            self.run = self._start_run(self.validate(x.shape, None), getattr(inner, "diffusion_model", None))
        self._inner = inner
        self._make_autograd_safe(guider, inner)
        guidance = self._guidance_at(sigma, inner)
        sigmas = model_options.get("transformer_options", {}).get("sample_sigmas")
        sigma_in = normal_tensor(timestep)
        own = [f for f in post_cfg_functions(model_options) if not any(f is g for g in self.run.host_post_cfg)]
        recorded: dict = {}
        options = without_post_cfg(model_options, own, recorded) if own else model_options

        def x0_fn(x_in: torch.Tensor) -> torch.Tensor:
            return executor(x_in, sigma_in, options, seed)

        result = guidance.evaluate(x, x0_fn)
        self._log_plan(guidance, result.x0_hat)
        recompute = guidance.denoiser_recompute
        if recompute is not None and recompute.planned and guidance.mode == "full" \
                and recompute.reason not in self.run.logged:
            self.run.logged.add(recompute.reason)
            log.info("DPS: gradient through the model: %s", recompute.reason)
        for note in guidance.notes:
            if note not in self.run.logged:
                self.run.logged.add(note)
                log.warning("DPS: %s", note)
        self.run.distances.append(result.distance.cpu())
        if self.report is not None:
            self.report(progress_text(self.run.distances, fell_back=guidance.mode != self.settings.mode))
        delta = schedule_step(sigma, sigmas, stages)
        correction = guided_correction(result, guidance, sigma, delta, x, alpha=signal_scale(inner.model_sampling, sigma))
        if self.run.sampler_filter is not None:
            correction = self.run.sampler_filter(sigma, correction, result.x0_hat)
        if stages is not None:
            correction = stages.first_feed(correction)
        out = result.x0_hat + correction
        if is_last_step(sigma, delta):      # the sampler returns this prediction: bring it to the noise floor
            out = final_refinement(guidance, out, distances=self.run.refined)
            self._report_refined(guidance)
        else:
            out = self._refine_final(guidance, stages, sigma, x, out)
        if own:
            out = feed_post_cfg(own, recorded, out, out - result.x0_hat)
        if self.interrupt is not None:
            self.interrupt()
        return out

    def _refine_final(self, guidance: DPSGuidance, stages: StageClock | None, sigma: float, x: torch.Tensor,
                      prediction: torch.Tensor) -> torch.Tensor:
        """The prediction, moved so that a sampler returning its last step's x (DPM-Solver-fast) returns it
        brought to the noise floor (``dps.host.final_stage_refinement``); as it is elsewhere."""
        before = len(self.run.refined)
        out = final_stage_refinement(guidance, stages, sigma, x, prediction, distances=self.run.refined)
        if len(self.run.refined) > before:
            self._report_refined(guidance)
        return out

    def _report_refined(self, guidance: DPSGuidance) -> None:
        if self.report is not None and self.run.refined:
            self.report(progress_text(self.run.distances, fell_back=guidance.mode != self.settings.mode,
                                      refined=self.run.refined[-1]))

    # ---- internals ----------------------------------------------------------------------------------
    def _sampler_filter(self, sampler: Any, sigmas: Any, patcher: Any) -> CorrectionFilter | None:
        """The correction filter of the sampler's family (``dps.samplers``): the written-out family of the
        ``KSAMPLER``'s function, else the weights probed from the function itself (LMS, iPNDM, DEIS, res_multistep,
        UniPC, ...); None for a single-step sampler and for one that can be neither (said once per node)."""
        function = getattr(sampler, "sampler_function", None)
        name = getattr(function, "__name__", None) or type(sampler).__name__
        if not isinstance(sigmas, torch.Tensor):
            return None
        ms = patcher.get_model_object("model_sampling") if patcher is not None else None
        family = None
        if callable(function):
            # what ComfyUI's samplers read off their model (KSamplerX0Inpaint): the guider's patcher and model
            host = SimpleNamespace(model_patcher=patcher, inner_model=SimpleNamespace(model_sampling=ms))
            family = sampler_family(function, sigmas, getattr(sampler, "extra_options", None) or {},
                                    {"inner_model": host})
            if isinstance(family, ProbedFamily) and name not in self._told:
                self._told.add(name)
                log.info("DPS: sampler %s: guidance fed through the weights read off the sampler (%d earlier "
                         "predictions)", name, family.history)
        if family is None:
            if name not in self._told:
                self._told.add(name)
                log.info("DPS: sampler %s has no multistep adapter here; guidance enters its predictions as for a "
                         "single-step sampler", name)
            return None
        if family.history == 0:
            return None
        filt = CorrectionFilter(family, sigmas, alpha=(lambda s: signal_scale(ms, s)) if ms is not None else None)
        far = filt.far_steps()
        if far and (name, len(far), len(sigmas)) not in self._told:
            self._told.add((name, len(far), len(sigmas)))
            log.info("DPS: sampler %s: %d of its %d steps extrapolate far (gain > %g); guided, they are taken at "
                     "first order", name, len(far), len(sigmas) - 1, filt.max_gain)
        return filt

    def _start_run(self, y: torch.Tensor, network: nn.Module | None) -> RunState:
        """The run's guidance objects; ``network`` is the model's denoiser network (``diffusion_model``), whose
        blocks recompute their activations in gradient "full" (``dps.recompute``)."""
        run = RunState()
        s = self.settings
        recompute = BlockRecompute(network, mode=s.denoiser_gradient, budget=s.memory_budget) \
            if isinstance(network, nn.Module) and s.mode == "full" else None

        def guidance(decoder_gradient: DecoderGradient) -> DPSGuidance:
            return DPSGuidance(operator=self.operator, noise=self.noise, y=y, zeta=s.zeta, rule=s.rule, mode=s.mode,
                               decoder_gradient=decoder_gradient, on_nonfinite=s.on_nonfinite,
                               inplace_safe=True,   # ControlNet residuals are added in place in the UNet
                               denoiser_recompute=recompute, fallback_on_oom=True)

        def gradient(module: nn.Module, call: Callable[[nn.Module, torch.Tensor], torch.Tensor],
                     ratio: int) -> DecoderGradient:
            tile = -(-s.vae_tile // ratio) if s.vae_tile else 0      # pixels -> latent pixels, rounded up
            return DecoderGradient(module, call, mode=s.vae_gradient, tile=tile, budget=s.memory_budget)

        if self.surrogate is not None:
            run.fast_guidance = guidance(gradient(self.surrogate, self._surrogate_call, 8))
        if self.uses_vae:
            fsm = self.vae.first_stage_model
            if s.precision == "fp32":
                with torch.inference_mode(False):
                    run.decoder_copy = copy.deepcopy(fsm).float().requires_grad_(False)
                make_autograd_safe([run.decoder_copy])
            run.guidance = guidance(gradient(run.decoder_copy or fsm, self._vae_call,
                                             getattr(self.vae, "downscale_ratio", 8)))
        return run

    def _guidance_at(self, sigma: float, inner: Any) -> DPSGuidance:
        """The fast decoder's guidance while the schedule is before ``fast_decoder_end``, the VAE's after."""
        if self.run.fast_guidance is None:
            return self.run.guidance
        if self.run.guidance is None or self._active(sigma, inner, 0.0, self.settings.fast_decoder_end):
            return self.run.fast_guidance
        return self.run.guidance

    def _active(self, sigma: float, inner: Any, start: float, end: float) -> bool:
        if self.settings.zeta <= 0 or sigma <= 0:
            return False
        ms = inner.model_sampling
        return float(ms.percent_to_sigma(end)) <= sigma <= float(ms.percent_to_sigma(start))

    def _log_plan(self, guidance: DPSGuidance, x0_hat: torch.Tensor) -> None:
        plan = guidance.decoder_gradient.plan_for(x0_hat)
        key = (id(guidance), plan.mode, plan.tile)
        if key not in self.run.logged:
            self.run.logged.add(key)
            which = "fast decoder" if guidance is self.run.fast_guidance else "VAE"
            log.info("DPS: gradient through the %s: %s (%s)", which, plan.mode, plan.reason)

    def _modules(self, guider: Any, inner: Any) -> list[nn.Module]:
        modules: list[nn.Module] = []
        if self.settings.mode == "full":                                # x0_only never differentiates the UNet
            modules.append(inner)
            for patcher in getattr(guider, "loaded_models", None) or []:   # ControlNets, T2I adapters, the VAE
                if isinstance(getattr(patcher, "model", None), nn.Module):
                    modules.append(patcher.model)
        if self.surrogate is not None:
            modules.append(self.surrogate)
        if self.uses_vae and self.settings.precision == "auto":
            modules.append(self.vae.first_stage_model)
        return modules

    def _make_autograd_safe(self, guider: Any, inner: Any) -> None:
        modules = self._modules(guider, inner)
        if needs_autograd_fix(modules):
            n = make_autograd_safe(modules)
            log.debug("DPS: copied %d inference tensors so gradients can flow", n)

    def _surrogate_call(self, decoder: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """TAESD takes model-space latents and returns [0, 1]: image in [-1, 1], float32, on the latent's device
        (``decoder`` is the surrogate or a view sharing its parameters, which ``.to`` moves in place)."""
        self.surrogate.to(x0.device)
        return decoder(x0.float()).float() * 2 - 1

    def _vae_call(self, first_stage: nn.Module, x0: torch.Tensor) -> torch.Tensor:
        """Model-space x0 (latent) → image in [-1, 1] through ``first_stage`` (the VAE's module, its float32
        copy, or a view of either), differentiable, float32."""
        latent = self._inner.process_latent_out(x0)
        param = next(self.vae.first_stage_model.parameters())
        if self.run is not None and self.run.decoder_copy is not None:
            self.run.decoder_copy.to(param.device)
            dtype = torch.float32
        else:
            dtype = getattr(self.vae, "vae_dtype", param.dtype)
        return first_stage.decode(latent.to(param.device, dtype)).float()

    def _decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Model-space x0 (latent) → image in [-1, 1] through the VAE as guidance decodes it."""
        return self._vae_call(self.run.decoder_copy if self.run and self.run.decoder_copy else
                              self.vae.first_stage_model, x0)

    def _finish_run(self) -> None:
        run, self.run = self.run, None
        self.last_run = run
        if run is not None and run.distances:
            first, last = run.distances[0], run.distances[-1]
            log.info("DPS: measurement residual %s -> %s over %d guided evaluations%s",
                     [round(float(v), 4) for v in first], [round(float(v), 4) for v in last], len(run.distances),
                     f", {[round(float(v), 4) for v in run.refined[-1]]} after the last step's refinement"
                     if run.refined else "")


POST_CFG = "sampler_post_cfg_function"     # the model_options key of ComfyUI's post-CFG functions


def post_cfg_functions(model_options: Any) -> list[Callable[[dict], torch.Tensor]]:
    """The post-CFG functions in ``model_options`` (ComfyUI calls each with the CFG result and the conditional and
    unconditional predictions, ``comfy.samplers.sampling_function``)."""
    return list(model_options.get(POST_CFG, None) or []) if isinstance(model_options, dict) else []


def without_post_cfg(model_options: dict, functions: list, recorded: dict) -> dict:
    """A copy of ``model_options`` whose post-CFG functions ``functions`` (a CFG++ sampler's, which read the
    unconditional prediction) are replaced by one that records its arguments (detached) into ``recorded``."""

    def record(args: dict) -> torch.Tensor:
        recorded.clear()
        recorded.update({k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
        return args["denoised"]

    kept = [f for f in post_cfg_functions(model_options) if not any(f is g for g in functions)]
    return {**model_options, POST_CFG: kept + [record]}


def feed_post_cfg(functions: list, recorded: dict, denoised: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """Call the post-CFG functions held back from the guided evaluation (``without_post_cfg``) with the guided
    prediction ``denoised`` and the conditional and unconditional predictions moved by the same ``change``, so that
    a CFG++ sampler sees the correction in both (``dps.samplers``); returns the last one's result, as ComfyUI
    chains them. Nothing is called when the evaluation did not reach them (ComfyUI did not either)."""
    if not recorded:
        return denoised
    for fn in functions:
        args = dict(recorded, denoised=denoised)
        for key in ("uncond_denoised", "cond_denoised"):
            if isinstance(recorded.get(key), torch.Tensor):
                args[key] = recorded[key] + change.to(recorded[key])
        denoised = fn(args)
    return denoised


def progress_text(distances: list[torch.Tensor], fell_back: bool = False, refined: torch.Tensor | None = None) -> str:
    """The line shown on the sampler node while it runs: the measurement residual ‖y − A(D(x0_hat))‖ of the
    first and the latest guided evaluation (the mean over the batch), or ``refined``, the sample's own after the
    last step's refinement (``dps.host.final_refinement``); ``fell_back``: the gradient fell back to x0_only
    after running out of memory (``DPSGuidance.fallback_on_oom``)."""
    first, last = (float(d.float().mean()) for d in (distances[0], distances[-1]))
    batch = distances[-1].numel()
    mean = f" (mean of {batch} images)" if batch > 1 else ""
    now = f"{float(refined.float().mean()):.4g} after the last step's refinement" if refined is not None \
        else f"{last:.4g}"
    return (f"DPS: measurement residual ‖y − A(x̂0)‖ {now}, from {first:.4g} "
            f"({len(distances)} guided evaluation{'' if len(distances) == 1 else 's'}){mean}"
            + ("; gradient x0_only after running out of memory" if fell_back else ""))


def apply_dps(model: Any, vae: Any, measurement: torch.Tensor, operator: Operator, noise: NoiseModel,
              settings: Settings, surrogate: nn.Module | None = None,
              interrupt: Callable[[], None] | None = None,
              report: Callable[[str], None] | None = None,
              wrapper_types: tuple[str, str] = (OUTER_SAMPLE, PREDICT_NOISE)) -> tuple[Any, DPSPatch]:
    """Check the inputs, then return a clone of ``model`` carrying one DPS patch (replacing any earlier one).
    ``interrupt`` raises when the user cancels; ``report`` receives a progress line after each guided evaluation."""
    check_inputs(model, vae, measurement, operator, noise, surrogate,
                 uses_vae=surrogate is None or settings.fast_decoder_end < 1.0)
    patch = DPSPatch(operator, noise, measurement, settings, vae=vae, surrogate=surrogate, interrupt=interrupt,
                     report=report)
    outer, predict = wrapper_types
    m = model.clone()
    m.remove_wrappers_with_key(outer, KEY)
    m.remove_wrappers_with_key(predict, KEY)
    m.add_wrapper_with_key(outer, KEY, patch.outer_sample)
    m.add_wrapper_with_key(predict, KEY, patch.predict_noise)
    if patch.uses_vae and getattr(vae, "patcher", None) is not None:
        m.set_additional_models("dps_vae", [vae.patcher])   # loaded to the GPU with the UNet for the run
    return m, patch


def signal_scale(model_sampling: Any, sigma: float) -> float:
    """α in ``x = α x0 + σε`` for the host's model sampling: 1 for ε/v models, 1 − σ for flow models
    (read off ``noise_scaling``, which ComfyUI defines for every model type, so no class is named)."""
    scaling = getattr(model_sampling, "noise_scaling", None)
    if scaling is None:
        return 1.0
    try:
        with torch.no_grad():
            alpha = scaling(torch.tensor([sigma]), torch.zeros(1), torch.ones(1))
        alpha = float(alpha.flatten()[0])
    except Exception:  # an unusual model sampling: fall back to the k-diffusion convention
        return 1.0
    return alpha if 0.0 < alpha <= 1.0 else 1.0
