"""Driver for tests/test_comfy_integration.py, run with the Python of a real ComfyUI checkout.

It runs in its own process, inside the ComfyUI tree (``COMFYUI_PATH`` on ``sys.path`` first, so ``import
nodes`` is ComfyUI's), and prints one JSON line. Commands:

* ``unet PATH``: write a tiny SD1.5-detectable UNet (random weights, safetensors) for the loaders, and beside it
  a ControlNet of the same architecture (``tiny_controlnet.safetensors``) and a rank-4 LoRA on its attention
  projections (``tiny_lora.safetensors``), all random and seeded.
* ``inprocess MODELS PACK TAESD [STRENGTH]``: load the pack through ComfyUI's custom-node loader, the UNet through
  ``UNETLoader`` and TAESD through ``VAELoader``; sample under ``torch.inference_mode()`` with KSampler
  (seven samplers, txt2img and img2img, a batch, a latent noise mask) and SamplerCustomAdvanced, with and without
  DPS at the same seed; report the measurement residuals.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys

COMFY = os.environ["COMFYUI_PATH"]
sys.path.insert(0, COMFY)
os.chdir(COMFY)

import comfy.options  # noqa: E402

comfy.options.enable_args_parsing(False)
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402


TINY = dict(image_size=32, in_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
            transformer_depth=[1], transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
            use_linear_in_transformer=False, use_spatial_transformer=True, legacy=False, adm_in_channels=None,
            dtype=torch.float32, device="cpu")


def _random_weights(state: dict, prefix: str) -> dict:
    """Unit norms, zero biases, fan-in-scaled Gaussian weights (the current torch seed)."""
    sd = {}
    for name, t in state.items():
        if "norm" in name and name.endswith("weight"):
            v = torch.ones_like(t)
        elif name.endswith("bias"):
            v = torch.zeros_like(t)
        else:
            fan_in = t[0].numel() if t.ndim > 1 else 1
            v = torch.randn_like(t) / max(fan_in, 1) ** 0.5
        sd[prefix + name] = v.contiguous()
    return sd


def write_unet(path: str) -> None:
    import comfy.ops
    from comfy.cldm.cldm import ControlNet
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    torch.manual_seed(0)
    unet = UNetModel(out_channels=4, transformer_depth_output=[1, 1], use_temporal_attention=False,
                     use_temporal_resblock=False, operations=comfy.ops.manual_cast, **TINY)
    sd = _random_weights(unet.state_dict(), "model.diffusion_model.")
    save_file(sd, path)
    folder = os.path.dirname(path)
    control = ControlNet(hint_channels=3, operations=comfy.ops.manual_cast, **TINY)
    save_file(_random_weights(control.state_dict(), "control_model."), os.path.join(folder, "tiny_controlnet.safetensors"))
    lora = {}
    for key, t in sd.items():
        if key.endswith(("to_q.weight", "to_k.weight", "to_v.weight")) and t.ndim == 2:
            base = key[len("model."):-len(".weight")]      # "diffusion_model.…", a key ComfyUI's LoRA loader maps
            lora[base + ".lora_up.weight"] = 0.5 * torch.randn(t.shape[0], 4)
            lora[base + ".lora_down.weight"] = 0.5 * torch.randn(4, t.shape[1]) / t.shape[1] ** 0.5
    save_file(lora, os.path.join(folder, "tiny_lora.safetensors"))


def test_picture(batch: int = 1, size: int = 64) -> torch.Tensor:
    """A smooth picture with edges: colour gradients and a disc, IMAGE (B, H, W, 3) in [0, 1]."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    disc = (((xx - 0.6) ** 2 + (yy - 0.4) ** 2) < 0.06).float()
    img = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy * (1 - disc), 0.8 * disc + 0.1], dim=-1)
    return img[None].repeat(batch, 1, 1, 1)


def inprocess(work: str, pack: str, taesd: str, strength: str = "1.0") -> dict:
    import folder_paths
    for kind in ("diffusion_models", "loras", "controlnet"):
        folder_paths.add_model_folder_path(kind, work)
    folder_paths.add_model_folder_path("vae_approx", taesd)
    import nodes
    import comfy.samplers
    import comfy.sample
    from comfy_extras import nodes_custom_sampler as ncs

    assert asyncio.run(nodes.load_custom_node(pack, module_parent="custom_nodes")), "pack did not load"
    n = nodes.NODE_CLASS_MAPPINGS
    out: dict = {"registered": sorted(k for k in n if k.startswith("DPS"))}
    with torch.inference_mode():
        model = nodes.UNETLoader().load_unet("tiny_sd15_unet.safetensors", "default")[0]
        vae = nodes.VAELoader().load_vae("taesd")[0]
        out["model_type"] = type(model.model).__name__
        cond = [[torch.zeros(1, 77, 768), {}]]
        op = n["DPSSuperResolution"].execute(factor=4, filter="bicubic").args[0]
        noise = n["DPSGaussianNoise"].execute(sigma=0.0).args[0]
        clean = test_picture()
        y_img = n["DPSMeasure"].execute(image=clean, operator=op, noise=noise, seed=0).args[0]
        y = y_img.movedim(-1, 1) * 2 - 1

        def apply(strength=float(strength), measurement=y_img, **kw):
            args = dict(model=model, vae=vae, measurement=measurement, operator=op, noise=noise, strength=strength,
                        step_rule="dps", gradient="full", start_percent=0.0, end_percent=1.0,
                        vae_precision="auto", fast_decoder="none")
            args.update(kw)
            return n["DPSApply"].execute(**args).args[0]

        def residual(latent: torch.Tensor) -> list[float]:
            img = vae.decode(latent).movedim(-1, 1) * 2 - 1
            return (op(img) - y).flatten(1).norm(dim=1).tolist()

        empty = {"samples": torch.zeros(1, 4, 8, 8)}
        guided = apply()
        # Random weights are no prior: from pure noise their x0 saturates the decoder, so most cases start
        # from the bicubic upscale of the measurement (img2img, denoise 0.6), as a restoration would.
        upscaled = torch.nn.functional.interpolate(y_img.movedim(-1, 1), scale_factor=4, mode="bicubic")
        start = {"samples": vae.encode(upscaled.movedim(1, -1).clamp(0, 1))}

        def ksample(m, latent, sampler="euler", seed=7, steps=4, denoise=0.6):
            return nodes.common_ksampler(m, seed, steps, 2.0, sampler, "karras", cond, cond, latent,
                                         denoise=denoise)[0]["samples"]

        def case(latent, **kw):
            return {"plain": residual(ksample(model, latent, **kw)), "dps": residual(ksample(guided, latent, **kw))}

        samplers = {}
        for sampler in ["euler", "euler_ancestral", "heun", "dpmpp_2m", "dpmpp_2m_sde", "ddim", "uni_pc"]:
            samplers[sampler] = case(start, sampler=sampler, steps=3 if sampler == "heun" else 4)
        out["samplers"] = samplers
        every = {}                                        # every sampler name the KSampler offers
        for sampler in comfy.samplers.SAMPLER_NAMES:
            result = samplers.get(sampler) or case(start, sampler=sampler, steps=4)
            every[sampler] = dict(result, finite=all(math.isfinite(v) for v in result["plain"] + result["dps"]))
        out["every_sampler"] = every
        out["txt2img"] = case(empty, denoise=1.0)
        out["batch"] = case({"samples": start["samples"].repeat(2, 1, 1, 1)}, seed=3)
        out["noise_mask"] = case(dict(start, noise_mask=torch.ones(1, 64, 64)), seed=9)

        def custom_advanced(m):
            guider = comfy.samplers.CFGGuider(m)
            guider.set_conds(cond, cond)
            guider.set_cfg(2.0)
            sigmas = comfy.samplers.calculate_sigmas(m.get_model_object("model_sampling"), "karras", 10).cpu()[-5:]
            sampler = comfy.samplers.sampler_object("dpmpp_2m")
            noise_t = comfy.sample.prepare_noise(start["samples"], 11)
            return guider.sample(noise_t, start["samples"], sampler, sigmas, seed=11)

        out["sampler_custom_advanced"] = {"plain": residual(custom_advanced(model)), "dps": residual(custom_advanced(guided))}

        # Beside a LoRA loader and Apply ControlNet in the same graph: LoRA -> Apply DPS -> KSampler, with the
        # ControlNet on the conditioning (its hint: the clean picture).
        lora_model = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "tiny_lora.safetensors", 1.0)[0]
        cnet = nodes.ControlNetLoader().load_controlnet("tiny_controlnet.safetensors")[0]
        pos, neg = nodes.ControlNetApplyAdvanced().apply_controlnet(cond, cond, cnet, clean, 1.0, 0.0, 1.0)
        lora_guided = apply(model=lora_model)

        def ksample_cn(m):
            return nodes.common_ksampler(m, 7, 4, 2.0, "euler", "karras", pos, neg, start, denoise=0.6)[0]["samples"]

        plain_lc = ksample_cn(lora_model)
        out["lora_controlnet"] = {"plain": residual(plain_lc), "dps": residual(ksample_cn(lora_guided))}
        base = ksample(model, start)
        no_cn = nodes.common_ksampler(lora_model, 7, 4, 2.0, "euler", "karras", cond, cond, start, denoise=0.6)[0]["samples"]
        out["lora_changes_output"] = float((no_cn - base).abs().max()) > 1e-4
        out["controlnet_changes_output"] = float((plain_lc - no_cn).abs().max()) > 1e-4

        proximal = apply(step_rule="proximal", strength=1.0)     # the data step on x0_hat, after its move through the UNet
        out["proximal"] = {name: {"plain": samplers[name]["plain"] if name in samplers else
                                  residual(ksample(model, start, sampler=name)),
                                  "dps": residual(ksample(proximal, start, sampler=name))}
                           for name in ("lcm", "euler_ancestral")}
        fast = apply(fast_decoder="taesd_decoder.safetensors")
        out["taesd_surrogate"] = {"plain": samplers["euler"]["plain"], "dps": residual(ksample(fast, start))}

        again = ksample(model, start)
        out["plain_after_guided_equal"] = residual(again) == samplers["euler"]["plain"]

        errors = {}
        try:
            wrong = apply(measurement=torch.zeros(1, 20, 20, 3))
            ksample(wrong, start)
        except ValueError as err:
            errors["measurement_size"] = str(err)
        try:
            mask = n["DPSBoxMask"].execute(width=32, height=32, box_width=8, box_height=8, margin=2, seed=0).args[0]
            inpaint = n["DPSInpainting"].execute(mask=mask).args[0]
            apply(operator=inpaint)
        except ValueError as err:
            errors["mask_size"] = str(err)
        out["errors"] = errors
    return out


if __name__ == "__main__":
    if sys.argv[1] == "unet":
        write_unet(sys.argv[2])
        print(json.dumps({"written": sys.argv[2]}))
    else:
        print("RESULT " + json.dumps(inprocess(*sys.argv[2:6])))
