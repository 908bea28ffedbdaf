"""Which strength should the host nodes default to? A host-free rehearsal of the ComfyUI/WebUI path.

The SD1.x-latent prior is turned into a k-diffusion denoiser D(x, σ) (x = x0 + σε, as the hosts sample), the
schedule is the host's "normal" one (steps evenly spaced in the training timesteps), the samplers are
k-diffusion's (written out below), and guidance is applied by ``dps.host.guided_correction``, the function the
ComfyUI hook and the WebUI script call, with x0_hat decoded by the real TAESD decoder; multistep samplers feed it
through their family's correction filter (``dps.samplers``) as the ComfyUI node does (``--plain-multistep``: the
correction unfiltered, as before the filter). It prints PSNR per task for a few strengths and rules, against the
best baseline.

    python bench/host_defaults.py --vae PATH/taesd_decoder.safetensors [--steps 20] [--images 8] [--json]

With ``--comfyui PATH`` (a ComfyUI checkout, run with ComfyUI's Python) any other sampler name is ComfyUI's own
function (``comfy.k_diffusion.sampling.sample_<name>``, ``uni_pc``, ``uni_pc_bh2``), driven through a denoiser as the
node drives it: the correction fed through the written-out family or the weights probed from the function.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps import DPSGuidance, Gaussian, alphas_cumprod_from_betas, linear_betas, sigma_from_alpha_cumprod  # noqa: E402
from dps.host import (FINAL_ITERATIONS, MOVE_SHARE, final_refinement, final_stage_refinement,  # noqa: E402
                      guided_correction, is_last_step)
from dps.progress import step_progress  # noqa: E402
from dps.schedule import timestep_sigmas  # noqa: E402
from dps.sampling import eps_denoiser, proximal_sample  # noqa: E402
from dps.samplers import MAX_GAIN, CorrectionFilter, family_for  # noqa: E402
from dps.app import DemoSettings, candidates, load_setup, measure, psnr  # noqa: E402


def euler(denoise, x, sigmas, guidance: DPSGuidance | None, filtered: bool = True,
          final_iterations: int = FINAL_ITERATIONS, move_share: float = MOVE_SHARE):
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the second stage)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, step_progress(i, len(sigmas) - 1),
                      final_iterations=final_iterations, move_share=move_share)
        x = x + (s_next - s) * (x - d) / s
    return x


def dpmpp_2m(denoise, x, sigmas, guidance: DPSGuidance | None, filtered: bool = True, eta: float = 0.0,
             seed: int = 1, final_iterations: int = FINAL_ITERATIONS, move_share: float = MOVE_SHARE):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) as k-diffusion writes it for an ε model
    (λ = −log σ): ``sample_dpmpp_2m`` with η = 0, ``sample_dpmpp_2m_sde`` (midpoint) with η > 0, whose noise is drawn
    per step here where ComfyUI draws it from a Brownian tree (the same distribution for each step). The guided
    prediction is what the multistep history keeps, as in the hosts."""
    gen = torch.Generator().manual_seed(seed)
    family = family_for("dpmpp_2m_sde", {"eta": eta}) if eta else family_for("dpmpp_2m")
    filt = CorrectionFilter(family, sigmas) if filtered else None
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, step_progress(i, len(sigmas) - 1), filt, final_iterations,
                      move_share)
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        w = -math.expm1(-(1 + eta) * h)
        x = (s_next / s) * math.exp(-eta * h) * x + w * d
        if old is not None:
            x = x + 0.5 * w * (h / h_last) * (d - old)
        if eta > 0:
            x = x + torch.randn(x.shape, generator=gen) * s_next * math.sqrt(-math.expm1(-2 * eta * h))
        old, h_last = d, h
    return x


def _denoised(denoise, x, s: float, s_next: float, guidance: DPSGuidance | None, progress: float,
              filt: CorrectionFilter | None = None, final_iterations: int = FINAL_ITERATIONS,
              move_share: float = MOVE_SHARE):
    s_in = x.new_full((x.shape[0],), s)
    if guidance is None or not guidance.active(progress):
        with torch.no_grad():
            return denoise(x, s_in)
    result = guidance.evaluate(x, lambda x_: denoise(x_, s_in))
    correction = guided_correction(result, guidance, s, s - s_next, x, move_share=move_share)
    out = result.x0_hat + (filt(s, correction, result.x0_hat) if filt is not None else correction)
    return final_refinement(guidance, out, final_iterations) if is_last_step(s, s - s_next) else out


def euler_ancestral(denoise, x, sigmas, guidance: DPSGuidance | None, filtered: bool = True, seed: int = 1,
                    final_iterations: int = FINAL_ITERATIONS, move_share: float = MOVE_SHARE):
    """k-diffusion's ``sample_euler_ancestral`` (η = 1): Euler down to σ_down, then fresh noise of σ_up."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, step_progress(i, len(sigmas) - 1),
                      final_iterations=final_iterations, move_share=move_share)
        sigma_up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        x = x + (sigma_down - s) * (x - d) / s
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=gen) * sigma_up
    return x


def host_sampler(function, name: str, options: dict | None = None, model_sampling: object | None = None,
                 max_gain: float = MAX_GAIN, cfg_pp_plain: bool = False):
    """ComfyUI's sampler ``function`` guided as the node guides it: the prediction at each model call is the guided
    x0_hat, the correction filtered through the sampler's family (written out or probed, ``dps.samplers``). The
    post-CFG functions a CFG++ sampler adds get the guided prediction as both the conditional and the unconditional
    one (the prior has no condition; the node feeds the correction to both, ``nodes.hook.feed_post_cfg``), or with
    ``cfg_pp_plain`` as the node did before: the unguided prediction as the unconditional one and no family (it had
    none for a CFG++ sampler; Euler's kind passed the correction unfiltered)."""
    plain_cfg_pp = cfg_pp_plain and name.endswith("_cfg_pp")
    from types import SimpleNamespace
    from dps.host import schedule_step
    from dps.samplers import sampler_family, stage_clock

    ms = model_sampling if model_sampling is not None else object()       # an ε model (not CONST)
    host = SimpleNamespace(model_patcher=SimpleNamespace(get_model_object=lambda n: ms),
                           inner_model=SimpleNamespace(model_sampling=ms))

    def run(denoise, x, sigmas, guidance: DPSGuidance | None, filtered: bool = True, seed: int = 1,
            final_iterations: int = FINAL_ITERATIONS, move_share: float = MOVE_SHARE):
        levels = [float(v) for v in sigmas]
        family = sampler_family(function, sigmas, options, {"inner_model": host}) \
            if filtered and not plain_cfg_pp else None
        filt = (CorrectionFilter(family, sigmas, max_gain=max_gain)
                if family is not None and family.history > 0 else None)
        stages = stage_clock(function, sigmas, options) if filtered else None
        run.family = family

        def model(x_, sigma, model_options: dict | None = None, **kwargs):
            out, plain = prediction(x_, sigma)
            for fn in (model_options or {}).get("sampler_post_cfg_function", []):
                unconditional = plain if plain_cfg_pp else out
                out = fn({"denoised": out, "uncond_denoised": unconditional, "cond_denoised": unconditional,
                          "input": x_, "sigma": sigma, "model_options": model_options})
            return out

        def prediction(x_, sigma):
            """(the prediction the sampler gets, the prior's own)"""
            s = float(sigma.flatten()[0])
            i = max(j for j, level in enumerate(levels[:-1]) if level >= s * (1 - 1e-5)) if s < levels[0] else 0
            s_in = x_.new_full((x_.shape[0],), s)
            held = stages.later_feed(s) if stages is not None and stages.later_stage(s, x_) else None
            if held is not None:
                with torch.no_grad():
                    plain = denoise(x_, s_in)
                return final_stage_refinement(guidance, stages, s, x_, plain + held, final_iterations), plain
            if guidance is None or not guidance.active(step_progress(i, len(levels) - 1)):
                with torch.no_grad():
                    plain = denoise(x_, s_in)
                return plain, plain
            result = guidance.evaluate(x_, lambda z: denoise(z, s_in))
            delta = schedule_step(s, sigmas, stages)
            correction = guided_correction(result, guidance, s, delta, x_, move_share=move_share)
            correction = filt(s, correction, result.x0_hat) if filt is not None else correction
            if stages is not None:
                correction = stages.first_feed(correction)
            out = result.x0_hat + correction
            if is_last_step(s, delta):
                return final_refinement(guidance, out, final_iterations), result.x0_hat
            return final_stage_refinement(guidance, stages, s, x_, out, final_iterations), result.x0_hat
        model.inner_model = host
        torch.manual_seed(seed)
        return function(model, x, sigmas.clone(), extra_args={"seed": seed}, callback=None, disable=True,
                        **(options or {}))
    return run


def comfy_samplers(path: str, names: list[str], max_gain: float = MAX_GAIN, cfg_pp_plain: bool = False) -> dict:
    """ComfyUI's samplers for ``names`` from the checkout at ``path`` (imported without its server): the function
    and options of its ``sampler_object(name)``, as the KSampler node gets them."""
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.model_sampling
    import comfy.samplers
    # what LCM, SA-Solver & co. read off the model: an ε model on SD's discrete schedule (ComfyUI's defaults)
    eps = type("EPSDiscrete", (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS), {})()
    out = {}
    for name in names:
        if name not in comfy.samplers.SAMPLER_NAMES:
            raise SystemExit(f"ComfyUI at {path} has no sampler {name!r}")
        sampler = comfy.samplers.sampler_object(name)
        out[name] = host_sampler(sampler.sampler_function, name, dict(sampler.extra_options), eps, max_gain,
                                 cfg_pp_plain)
    return out


def comfy_schedule(path: str, name: str, steps: int) -> torch.Tensor:
    """ComfyUI's scheduler ``name`` (``comfy.samplers.calculate_sigmas``) for ``steps`` steps on the prior's own
    discrete schedule (the linear β of ``dps.linear_betas``, 1e-4 to 0.02 over 1000 steps: ComfyUI's
    ``sqrt_linear``), as a checkpoint's model sampling object gives it to the KSampler."""
    from types import SimpleNamespace
    comfy_samplers(path, [])
    import comfy.model_sampling
    import comfy.samplers
    if name not in comfy.samplers.SCHEDULER_NAMES:
        raise SystemExit(f"ComfyUI at {path} has no scheduler {name!r}; it has {comfy.samplers.SCHEDULER_NAMES}")
    config = SimpleNamespace(sampling_settings={"beta_schedule": "sqrt_linear", "linear_start": 1e-4,
                                                "linear_end": 0.02, "timesteps": 1000})
    sampling = comfy.model_sampling.ModelSamplingDiscrete(config)
    return comfy.samplers.calculate_sigmas(sampling, name, steps).float()


def proximal(denoise, x, sigmas, guidance: DPSGuidance, filtered: bool = True, seed: int = 1,
             final_iterations: int = FINAL_ITERATIONS, move_share: float = MOVE_SHARE):
    """``dps.sampling.proximal_sample`` at its defaults: the data-consistency step on x0_hat and fresh noise (the
    guidance's rule and ζ are not used; the other options concern the hosts' samplers)."""
    return proximal_sample(denoise, x, sigmas, guidance, generator=torch.Generator().manual_seed(seed))


DISCARD_PENULTIMATE = {"dpm_2", "dpm_2_ancestral", "uni_pc", "uni_pc_bh2"}
SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m,
            "dpmpp_2m_sde": functools.partial(dpmpp_2m, eta=1.0), "proximal": proximal}
# The "simple baseline" per task (bicubic, mean fill, the blurred measurement itself).
SIMPLE = {"super_resolution": "bicubic", "box_inpainting": "mean fill", "random_inpainting": "mean fill",
          "gaussian_deblur": "measurement", "motion_deblur": "measurement"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vae", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tasks", default="super_resolution,box_inpainting,gaussian_deblur")
    p.add_argument("--settings", default="dps:0.3,dps:1,dps:3,schedule:0.3,schedule:2,polyak:0.3")
    p.add_argument("--samplers", default="euler")
    p.add_argument("--mode", default="full", choices=("full", "x0_only"))
    p.add_argument("--offset", type=int, default=50,
                   help="first held-out digit (50: the tuning digits; 0: the demo's evaluation digits)")
    p.add_argument("--start", type=float, default=0.0, help="guide from this fraction of the steps on")
    p.add_argument("--plain-multistep", action="store_true",
                   help="feed multistep samplers the rule's correction unfiltered (the behaviour before dps.samplers)")
    p.add_argument("--max-gain", type=float, default=MAX_GAIN,
                   help="with --comfyui: a multistep step whose extrapolation gain exceeds this is taken at first order "
                        "(dps.samplers.CorrectionFilter; inf: never, as before)")
    p.add_argument("--comfyui", help="a ComfyUI checkout: other sampler names are its own functions")
    p.add_argument("--host-functions", action="store_true",
                   help="with --comfyui: every sampler from ComfyUI, euler and dpmpp_2m included")
    p.add_argument("--cfg-pp-plain", action="store_true",
                   help="with --comfyui: a CFG++ sampler guided as the node guided it before it fed the correction to "
                        "both predictions (the unconditional one unguided, no multistep family)")
    p.add_argument("--scheduler", default="uniform",
                   help="uniform: evenly spaced timesteps (ComfyUI's normal); karras, exponential: ComfyUI's functions "
                        "between the prior's smallest and largest σ; any other name of ComfyUI's KSampler (normal, "
                        "sgm_uniform, simple, ddim_uniform, beta, linear_quadratic, kl_optimal): "
                        "comfy.samplers.calculate_sigmas on the prior's own discrete schedule (these need --comfyui)")
    p.add_argument("--final-iterations", type=int, default=FINAL_ITERATIONS,
                   help="Polyak iterations on the prediction of the step to σ = 0 (dps.host.final_refinement; 0: none, "
                        "as before)")
    p.add_argument("--move-share", type=float, default=MOVE_SHARE,
                   help="the share of the next level's size one guided step may move x by (dps.host.step_limit; "
                        "inf: no such bound, as before it existed)")
    p.add_argument("--discard-penultimate", default="",
                   help="more sampler names to run on the levels ComfyUI gives UniPC and DPM-2 (one level more, the "
                        "penultimate dropped): e.g. euler, the reference for those samplers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    samplers = dict(SAMPLERS)
    others = [n for n in args.samplers.split(",") if n not in samplers or (args.host_functions and n != "proximal")]
    if others and not args.comfyui:
        raise SystemExit(f"samplers {others} need --comfyui PATH (ComfyUI's own functions); here: {sorted(SAMPLERS)}")
    if others:
        samplers.update(comfy_samplers(args.comfyui, others, args.max_gain, args.cfg_pp_plain))
    s = DemoSettings(images=args.images, latent=True, vae=args.vae, offset=args.offset)
    setup = load_setup(s)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    denoise = eps_denoiser(setup.prior.eps_model(), ac)
    if args.scheduler != "uniform" and not args.comfyui:
        raise SystemExit(f"--scheduler {args.scheduler} needs --comfyui PATH (ComfyUI's schedule functions)")

    def schedule(steps: int) -> torch.Tensor:
        if args.scheduler not in ("uniform", "karras", "exponential"):
            return comfy_schedule(args.comfyui, args.scheduler, steps)
        if args.scheduler != "uniform":
            comfy_samplers(args.comfyui, [])              # ComfyUI importable without its server
            import comfy.k_diffusion.sampling as ks
            ends = sigma_from_alpha_cumprod(ac[[0, len(ac) - 1]])
            make = ks.get_sigmas_karras if args.scheduler == "karras" else ks.get_sigmas_exponential
            return make(steps, float(ends[0]), float(ends[1])).float()    # ends with 0
        return timestep_sigmas(ac, steps)

    sigmas = schedule(args.steps)
    discard = DISCARD_PENULTIMATE | set(filter(None, args.discard_penultimate.split(",")))
    # ComfyUI's KSampler gives these samplers one level more and drops the penultimate (comfy/samplers.py,
    # DISCARD_PENULTIMATE_SIGMA_SAMPLERS): UniPC's last step would otherwise end at its 0.001 stand-in for 0.
    discarded = torch.cat([schedule(args.steps + 1)[:-2], torch.zeros(1)])
    x_T = torch.randn((args.images, *setup.prior.shape), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task in args.tasks.split(","):
        op, y = measure(task, setup.truth, s)
        base = candidates(op, y)
        scores = {f"baseline ({n})": float(psnr(b, setup.truth).mean()) for n, b in base.items()}
        best = max(scores, key=scores.get)
        simple = f"baseline ({SIMPLE[task]})"
        for name in args.samplers.split(","):
            row = table.setdefault(name, {}).setdefault(task, {simple: scores[simple], best: scores[best]})
            for setting in args.settings.split(","):
                rule, zeta = setting.split(":")
                g = DPSGuidance(op, Gaussian(s.sigma), y, zeta=float(zeta), rule=rule, mode=args.mode, start=args.start,
                                decoder=setup.decoder, on_nonfinite="skip")
                levels = discarded if name in discard else sigmas
                z = samplers[name](denoise, x_T.clone(), levels, g, filtered=not args.plain_multistep,
                                   final_iterations=args.final_iterations, move_share=args.move_share)
                with torch.no_grad():
                    row[setting] = float(psnr(setup.decoder(z).clamp(-1, 1), setup.truth).mean())
                print(f"{name:9s} {task:18s} {setting:12s} {row[setting]:6.2f} dB   ({simple} {scores[simple]:.2f}, "
                      f"{best} {scores[best]:.2f})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "scheduler": args.scheduler, "images": args.images,
                          "offset": args.offset, "mode": args.mode,
                          "start": args.start,
                          "plain_multistep": args.plain_multistep, "cfg_pp_plain": args.cfg_pp_plain,
                          "max_gain": args.max_gain,
                          "final_iterations": args.final_iterations, "move_share": args.move_share,
                          "discard_penultimate": sorted(discard & set(table)), "psnr": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
