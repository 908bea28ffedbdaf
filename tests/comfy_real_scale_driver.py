"""Driver for tests/test_comfy_real_scale.py and tests/test_comfy_taesd_plumbing.py, run with the Python of a real
ComfyUI checkout (``COMFYUI_PATH``), one process per call so that each family's memory is returned to the
system. Prints ``RESULT <json>`` on its last line.

* ``family NAME PACK MODES``: build the family's real architecture with random weights
  (``comfy_families.build``), load the pack through ComfyUI's custom-node loader and run KSampler (euler, 64 px)
  under ``torch.inference_mode()``: unguided, then guided (``nodes.hook.apply_dps`` with ComfyUI's wrapper types)
  in the first ``vae_gradient`` value of ``MODES`` (a JSON list; ``[null]`` when the setting does not exist) at
  the family's CFG, then one guided step at CFG 1 in each other mode. Reports the residuals, the distances the
  guided runs saw, the α each guided step used against the host's ``noise_scaling``, the guidance decode
  against the host's VAE Decode, the latent format's constants, each mode's J_Dᵀv against "full", peak memory.
* ``taesd PACK TAESD_DIR MODES``: for each of taesd, taesdxl, taesd3 and taef1 loaded by ``VAELoader`` from
  ``TAESD_DIR`` (as ``models/vae_approx``), with a small model of the family, with and without the fast decoder
  (the node's own TAESD decoder loader): a guided KSampler per mode, and for the first mode the image guidance
  decodes from a latent against the host's VAE Decode of it, for the sampled latent and for a real photo
  (scikit-image's astronaut) encoded by the host's VAE Encode.

Threads: ``COMFYUI_TEST_THREADS`` (default 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfy_families as cf

cf.setup_comfy()
os.chdir(os.environ["COMFYUI_PATH"])
import torch

# One thread unless told otherwise: on a shared 2-core machine two OpenMP threads per process were 4-5x slower
# than one (the full SD1.5 UNet forward at 64 px: 25 s vs 6 s with a dozen other jobs running).
torch.set_num_threads(int(os.environ.get("COMFYUI_TEST_THREADS", "1")))
SIZE = 64          # image side in pixels (latent 8x8)
FACTOR = 4         # x4 super-resolution: the measurement is 16x16
STEPS = 2          # a whole guided run; the other modes guide one step each
TAESD_NAMES = {"sd15": "taesd", "sdxl": "taesdxl", "sd3": "taesd3", "flux": "taef1"}


def peak_gb() -> float:
    """Peak resident memory of this process so far (GB; ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def test_picture(size: int = SIZE) -> torch.Tensor:
    """A smooth picture with edges: colour gradients and a disc, IMAGE (1, H, W, 3) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((xx - 0.6) ** 2 + (yy - 0.4) ** 2) < 0.06).float()
    return torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy * (1 - disc), 0.8 * disc + 0.1], dim=-1)[None]


def load_pack(pack: str):
    """Load the node pack as ComfyUI does; return (NODE_CLASS_MAPPINGS, its nodes.hook, its dps.vae_gradient)."""
    import nodes
    assert asyncio.run(nodes.load_custom_node(pack, module_parent="custom_nodes")), "pack did not load"
    apply_cls = nodes.NODE_CLASS_MAPPINGS["DPSApply"]
    base = apply_cls.__module__.rsplit(".", 2)[0]          # <pack>.nodes.v3 -> <pack>
    return nodes.NODE_CLASS_MAPPINGS, sys.modules[f"{base}.nodes.hook"], sys.modules.get(f"{base}.dps.vae_gradient")


def settings_for(hook, mode: str | None, **kw):
    if mode is not None:
        kw["vae_gradient"] = mode
        if mode == "tiled":
            kw["vae_tile"] = SIZE // 2      # 4 tiles of the 8x8 latent (their 8-pixel overlap reaches the whole latent)
    return hook.Settings(**kw)


def spy_alpha(hook) -> list:
    """Record (σ, α) of every guided step: wraps the function of ``nodes.hook`` that receives α (the module global
    its PREDICT_NOISE wrapper calls: ``guided_correction``, or ``guided_denoised`` in older versions)."""
    seen: list = []
    name = next((n for n in ("guided_correction", "guided_denoised") if hasattr(hook, n)), None)
    if name is None:
        raise RuntimeError("nodes.hook calls neither guided_correction nor guided_denoised; update the spy")
    original = getattr(hook, name)

    def recording(result, guidance, sigma, delta_sigma, x, alpha=1.0, **kw):
        seen.append((float(sigma), float(alpha)))
        return original(result, guidance, sigma, delta_sigma, x, alpha=alpha, **kw)

    setattr(hook, name, recording)
    return seen


def spy_gradients(hook) -> list:
    """Record the gradient of every guidance evaluation and the recomputation the guidance used (blocks chosen,
    blocks in all): wraps ``DPSGuidance.evaluate`` of the pack's core."""
    seen: list = []
    cls = hook.DPSGuidance
    original = cls.evaluate

    def recording(self, x_t, x0_fn):
        result = original(self, x_t, x0_fn)
        rc = getattr(self, "denoiser_recompute", None)
        seen.append((result.grad.detach().clone(), None if rc is None else (len(rc.chosen or []), len(rc.blocks))))
        return result

    cls.evaluate = recording
    return seen


def host_alpha(model_sampling, sigma: float) -> float:
    """α of x = α x0 + σ ε as ComfyUI's own noise_scaling defines it (latent 1, noise 0)."""
    with torch.no_grad():
        return float(model_sampling.noise_scaling(torch.tensor([sigma]), torch.zeros(1), torch.ones(1)).flatten()[0])


def run_family(name: str, pack: str, modes: list) -> dict:
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    import nodes
    n, hook, _ = load_pack(pack)
    out: dict = {"family": name}
    t0 = time.perf_counter()
    fam = cf.build(name, "real", seed=0)
    out.update(info=fam.info, parameters=fam.parameters, build_s=round(time.perf_counter() - t0, 1),
               peak_gb_built=round(peak_gb(), 2))
    model, vae, inner = fam.model, fam.vae, fam.model.model
    out["vae"] = {"class": type(vae.first_stage_model).__name__, "latent_channels": vae.latent_channels}

    # The latent format as the host applies it: process_in(z) = (z - shift) * scale, process_out its inverse.
    fmt = inner.latent_format
    z = torch.randn(1, fam.latent_channels, 8, 8)
    shift = float(getattr(fmt, "shift_factor", 0.0) or 0.0)
    out["latent_format"] = {
        "scale": float(fmt.scale_factor), "shift": shift,
        "process_in": float((inner.process_latent_in(z) - (z - shift) * fmt.scale_factor).abs().max()),
        "process_out": float((inner.process_latent_out(z) - (z / fmt.scale_factor + shift)).abs().max()),
    }

    op = n["DPSSuperResolution"].execute(factor=FACTOR, filter="bicubic").args[0]
    noise = n["DPSGaussianNoise"].execute(sigma=0.02).args[0]
    y_img = n["DPSMeasure"].execute(image=test_picture(), operator=op, noise=noise, seed=0).args[0]
    y = y_img.movedim(-1, 1) * 2 - 1
    seen = spy_alpha(hook)

    def residual(samples: torch.Tensor) -> list[float]:
        img = vae.decode(samples).movedim(-1, 1) * 2 - 1            # the host's VAE Decode
        return (op(img) - y).flatten(1).norm(dim=1).tolist()

    def ksample(m, steps: int, cfg: float) -> torch.Tensor:
        latent = {"samples": torch.zeros(1, fam.latent_channels, SIZE // 8, SIZE // 8)}
        return nodes.common_ksampler(m, 7, steps, cfg, "euler", "normal", fam.positive, fam.negative, latent,
                                     denoise=1.0)[0]["samples"]

    def guide(mode, steps: int, cfg: float, **kw):
        settings = settings_for(hook, mode, **kw)
        guided, patch = hook.apply_dps(model, vae, y_img, op, noise, settings,
                                       interrupt=mm.throw_exception_if_processing_interrupted,
                                       wrapper_types=(pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.PREDICT_NOISE))
        print(f"[driver] {name} {mode} steps={steps} cfg={cfg}", file=sys.stderr, flush=True)
        seen.clear()
        t0 = time.perf_counter()
        samples = ksample(guided, steps, cfg)
        seconds = time.perf_counter() - t0
        run = patch.last_run
        plans = [{"mode": p.mode, "tile": p.tile} for p in run.guidance.decoder_gradient.plans.values()] \
            if run.guidance is not None and hasattr(run.guidance, "decoder_gradient") else []
        result = {"steps": steps, "cfg": cfg, "finite": bool(torch.isfinite(samples).all()),
                  "distances": [[round(float(v), 5) for v in d] for d in run.distances],
                  "alphas": [(s, a, host_alpha(inner.model_sampling, s)) for s, a in seen],
                  "plans": plans, "seconds": round(seconds, 1)}
        return samples, patch, result

    with torch.inference_mode():
        t0 = time.perf_counter()
        plain = ksample(model, STEPS, fam.cfg)
        out["plain"] = {"residual": residual(plain), "finite": bool(torch.isfinite(plain).all()),
                        "seconds": round(time.perf_counter() - t0, 1), "peak_gb": round(peak_gb(), 2)}
        # The first mode (the default) guides a whole run at the family's CFG. Each other mode then guides one
        # step at CFG 1 (one model evaluation), compared with mode "full" (exact modes at this size).
        samples, patch, main = guide(modes[0], STEPS, fam.cfg)
        main["residual"] = residual(samples)
        # The image guidance decodes from a model-space latent vs the host's VAE Decode of the same latent
        # (KSampler returns process_latent_out(x); guidance sees x and undoes the format itself).
        x0 = inner.process_latent_in(samples)
        with torch.no_grad():
            g_img = (patch.last_run.guidance.decoder_gradient.decode(x0)
                     if hasattr(patch.last_run.guidance, "decoder_gradient") else patch._decode(x0))
        host_img = vae.decode(samples).movedim(-1, 1)
        main["decode_max_diff"] = float((((g_img + 1) / 2).clamp(0, 1) - host_img).abs().max())
        main["decode_saturated"] = float(((host_img == 0) | (host_img == 1)).float().mean())
        main["peak_gb"] = round(peak_gb(), 2)
        out["main"] = main
        out["one_step"] = {}
        outputs = {}
        for mode in (modes[1:] if len(modes) > 1 else []):
            outputs[mode], _, out["one_step"][mode] = guide(mode, 1, 1.0)
        for mode, one in outputs.items():
            ref = outputs.get("full", one)
            out["one_step"][mode]["rel_diff_vs_full"] = float((one - ref).norm() / ref.norm())
        out["one_step_peak_gb"] = round(peak_gb(), 2)
        # The denoiser's blocks recomputed in the backward pass (dps.recompute) against the plain backward pass:
        # one guided step at CFG 1, the same gradient expected (the same arithmetic).
        fields = {f.name for f in dataclasses.fields(hook.Settings)}
        if "denoiser_gradient" in fields:
            grads = spy_gradients(hook)
            out["denoiser"] = {}
            for dg in ("full", "checkpointed"):
                grads.clear()
                guide(modes[0], 1, 1.0, denoiser_gradient=dg)
                out["denoiser"][dg] = {"recomputed": grads[0][1], "grad": grads[0][0]}
            ref, rec = out["denoiser"]["full"].pop("grad"), out["denoiser"]["checkpointed"].pop("grad")
            out["denoiser"]["rel_diff"] = float((rec - ref).norm() / ref.norm())
            out["denoiser"]["grad_norm"] = float(ref.norm())
    out["vjp"] = vjp_agreement(hook, patch, x0) if modes != [None] else {}
    out["peak_gb"] = round(peak_gb(), 2)
    return out


def vjp_agreement(hook, patch, x0: torch.Tensor) -> dict:
    """Relative difference of each vae_gradient mode's J_Dᵀv from the full backward pass, through the family's
    VAE as the last guided run decoded it (same module and call), v a fixed random image-space vector."""
    vg = sys.modules[hook.__name__.rsplit(".", 2)[0] + ".dps.vae_gradient"]
    base = patch.last_run.guidance.decoder_gradient
    torch.manual_seed(1)
    z = x0.detach().clone()
    v = torch.randn(z.shape[0], 3, z.shape[-2] * 8, z.shape[-1] * 8)
    grads = {}
    for mode in vg.VAE_GRADIENTS:
        dg = vg.DecoderGradient(base.module, base.call, mode=mode, tile=4 if mode == "tiled" else 0)
        grads[mode] = dg.vjp(z, v).float()
    ref = grads["full"]
    return {m: float((g - ref).norm() / ref.norm()) for m, g in grads.items()}


def run_taesd(pack: str, taesd_dir: str, modes: list) -> dict:
    import comfy.patcher_extension as pe
    import folder_paths
    import numpy as np
    from skimage import data

    import nodes
    folder_paths.add_model_folder_path("vae_approx", taesd_dir)
    n, hook, _ = load_pack(pack)
    v3 = sys.modules[n["DPSApply"].__module__]
    astronaut = torch.from_numpy(data.astronaut().astype(np.float32) / 255.0)[None]      # (1, 512, 512, 3)
    photo = astronaut[:, ::2, ::2].contiguous()                                         # 256 px, decode checks
    small = torch.nn.functional.interpolate(astronaut.movedim(-1, 1), size=(SIZE, SIZE), mode="area").movedim(1, -1)
    op = n["DPSSuperResolution"].execute(factor=FACTOR, filter="bicubic").args[0]
    noise = n["DPSGaussianNoise"].execute(sigma=0.0).args[0]
    y_img = n["DPSMeasure"].execute(image=small, operator=op, noise=noise, seed=0).args[0]  # 16x16
    out: dict = {"vae_list": nodes.VAELoader.vae_list(), "families": {}}
    for family, name in TAESD_NAMES.items():
        res: dict = {"taesd": name}
        fam = cf.build(family, "tiny", seed=0, vae=False)
        model, inner = fam.model, fam.model.model
        with torch.inference_mode():
            vae = nodes.VAELoader().load_vae(name)[0]               # encoder + decoder, vae_scale and vae_shift
            res["vae_latent_channels"] = vae.latent_channels
            res["vae_scale_shift"] = [float(vae.first_stage_model.vae_scale), float(vae.first_stage_model.vae_shift)]
            res["model_scale_shift"] = [float(inner.latent_format.scale_factor),
                                        float(getattr(inner.latent_format, "shift_factor", 0.0) or 0.0)]
            photo_latent = nodes.VAEEncode().encode(vae, photo)[0]["samples"]            # raw latent, 32x32
            small_latent = nodes.VAEEncode().encode(vae, small)[0]["samples"]            # 8x8
            host_photo = nodes.VAEDecode().decode(vae, {"samples": photo_latent})[0]
            res["photo_roundtrip_psnr"] = float(-10 * torch.log10(((host_photo - photo) ** 2).mean()))
            surrogate = v3._load_taesd_decoder(f"{name}_decoder.safetensors")           # fast_decoder's loader
            for fast in (False, True):
                for i, mode in enumerate(modes):
                    print(f"[driver] {family} {'fast' if fast else 'vae'} {mode}", file=sys.stderr, flush=True)
                    settings = settings_for(hook, mode, zeta=1.0)
                    guided, patch = hook.apply_dps(
                        model, vae, y_img, op, noise, settings, surrogate=surrogate if fast else None,
                        wrapper_types=(pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.PREDICT_NOISE))
                    latent = {"samples": torch.zeros(1, fam.latent_channels, SIZE // 8, SIZE // 8)}
                    samples = nodes.common_ksampler(guided, 3, 2 if i == 0 else 1, fam.cfg, "euler", "normal",
                                                    fam.positive, fam.negative, latent, denoise=1.0)[0]["samples"]
                    run = patch.last_run
                    guidance = run.fast_guidance if fast else run.guidance
                    case = {"finite": bool(torch.isfinite(samples).all()),
                            "distances": [[round(float(v), 5) for v in d] for d in run.distances],
                            "plans": [p.mode for p in guidance.decoder_gradient.plans.values()]}
                    if i == 0:     # the decode does not depend on the mode
                        for label, raw in (("sampled", samples), ("photo", photo_latent), ("small", small_latent)):
                            x0 = inner.process_latent_in(raw)                   # model space, as guidance sees it
                            with torch.no_grad():
                                g_img = guidance.decoder_gradient.decode(x0)
                            host = nodes.VAEDecode().decode(vae, {"samples": raw})[0].movedim(-1, 1)
                            case[label] = {"max_diff": float((((g_img + 1) / 2).clamp(0, 1) - host).abs().max()),
                                           "saturated": float(((host == 0) | (host == 1)).float().mean())}
                            if label == "small":    # the residual guidance measures at the photo's own latent
                                case[label]["distance"] = float(guidance.image_distance(g_img)[0])
                        with torch.no_grad():
                            zero = guidance.decoder_gradient.decode(torch.zeros_like(small_latent))
                            case["zero_latent_distance"] = float(guidance.image_distance(zero)[0])
                    res[f"{'fast' if fast else 'vae'}/{mode}"] = case
        out["families"][family] = res
    out["peak_gb"] = round(peak_gb(), 2)
    return out


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "family":
        result = run_family(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    elif command == "taesd":
        result = run_taesd(sys.argv[2], sys.argv[3], json.loads(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {command!r}")
    print("RESULT " + json.dumps(result))
