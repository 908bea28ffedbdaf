"""Fakes of the Stable Diffusion WebUI host contracts the DPS script relies on, for tests without a WebUI.

Faithful to AUTOMATIC1111 @82a973c / Forge @dfdcbab as read in their ``modules/`` sources at those commits:

* ``modules.scripts``: ``Script``, ``AlwaysVisible``; scripts are loaded from file with the extension root
  put on ``sys.path`` only during the import (``load_script``), as ``modules/scripts.py:509-523`` does.
* A1111 sampling: ``CFGDenoiser.forward(x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond)``
  (cond+uncond batch, CFG, ``sampler.last_latent``/``store_latent`` side outputs, mask blend), a
  CompVisDenoiser-like inner model, a ``@torch.no_grad`` k-diffusion Euler/Heun loop and DDIM over a
  timesteps denoiser that returns eps; ``process_images`` runs the Script lifecycle under ``no_grad``.
* Forge: weights loaded under ``torch.inference_mode`` (inference tensors), a UNet patcher with
  ``clone``/``model_options``/``set_model_sampler_post_cfg_function``, ``forge_objects`` reset before
  every sampling, and sampling under ``torch.inference_mode``.

The toy "UNet" is a Gaussian-prior denoiser plus a random conv (a non-trivial Jacobian), the "VAE decoder"
a 1x1 conv with pixel shuffle (latent 4ch -> RGB at 2x) and tanh.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

SIGMA_DATA = 1.0


class InterruptedException(BaseException):
    pass


# ---------------------------------------------------------------- gradio and modules.* stubs


class _Component:
    def __init__(self, *args, value=None, label=None, **kwargs):
        if args and isinstance(args[0], (bool, str)) and value is None and label is None:
            value = args[0] if isinstance(args[0], bool) else None
            label = args[0] if isinstance(args[0], str) else None
        self.value, self.label, self.kwargs = value, label or kwargs.get("label"), kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    for name in ("Row", "Column", "Accordion", "Checkbox", "Dropdown", "Radio", "Slider", "Number", "Image",
                 "Textbox", "Group"):
        setattr(gr, name, type(name, (_Component,), {}))
    gr.buttons = []

    class Button(_Component):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            gr.buttons.append(self)

        def click(self, fn, inputs, outputs):
            self.clicked = (fn, inputs, outputs)

    gr.Button = Button
    gr.Blocks = type("Blocks", (_Component,), {})
    gr.update = lambda **kw: dict(kw, __type__="update")
    return gr


class Script:
    """modules.scripts.Script: hooks are no-ops; ``elem_id`` as in scripts.py."""

    filename = None
    args_from = None
    args_to = None
    infotext_fields = None
    paste_field_names = None
    is_txt2img = False
    is_img2img = False

    def title(self):
        raise NotImplementedError

    def elem_id(self, item_id):
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_{item_id}"

    def process(self, p, *args):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


def make_modules() -> dict[str, types.ModuleType]:
    modules = types.ModuleType("modules")
    modules.__path__ = []
    scripts = types.ModuleType("modules.scripts")
    scripts.Script, scripts.AlwaysVisible = Script, object()
    scripts.scripts_data = []   # ScriptClassData(script_class, path, basedir, module) of every loaded script
    shared = types.ModuleType("modules.shared")
    shared.state = types.SimpleNamespace(current_latent=None, interrupted=False)
    shared.cmd_opts = types.SimpleNamespace(medvram=False, lowvram=False)
    shared.sd_model = None
    ui_components = types.ModuleType("modules.ui_components")

    class InputAccordion(_Component):
        pass

    ui_components.InputAccordion = InputAccordion
    low = types.ModuleType("modules.lowvram")
    low.is_enabled = lambda sd_model: getattr(sd_model, "lowvram", False)  # modules/lowvram.py:164-165
    for name, mod in (("scripts", scripts), ("shared", shared), ("ui_components", ui_components), ("lowvram", low)):
        setattr(modules, name, mod)
    shared.opts = types.SimpleNamespace(outdir_samples="", outdir_img2img_samples="outputs/img2img",
                                        outdir_grids="", outdir_img2img_grids="outputs/grids")
    processing = types.ModuleType("modules.processing")

    class StableDiffusionProcessingImg2Img(Processing):
        def __init__(self, sd_model=None, init_images=None, mask=None, width=512, height=512, steps=20,
                     seed=-1, **kwargs):
            super().__init__(sd_model, width=width, height=height, steps=steps, seed=seed, init_images=init_images,
                             image_mask=mask)
            self.kwargs = kwargs
            self.closed = False
            processing.created.append(self)

        def close(self):
            self.closed = True

    processing.created = []
    processing.StableDiffusionProcessingImg2Img = StableDiffusionProcessingImg2Img
    processing.process_images = lambda p: run_processing(p, lambda p_: KDiffusionSampler(p_.sd_model, shared))
    callbacks = types.ModuleType("modules.script_callbacks")
    callbacks.ui_tabs = []
    callbacks.on_ui_tabs = callbacks.ui_tabs.append
    callbacks.before_ui = []
    callbacks.on_before_ui = callbacks.before_ui.append   # script_callbacks.py: on_before_ui(callback)
    for name, mod in (("processing", processing), ("script_callbacks", callbacks)):
        setattr(modules, name, mod)
    return {"modules": modules, "modules.scripts": scripts, "modules.shared": shared,
            "modules.ui_components": ui_components, "modules.lowvram": low, "modules.processing": processing,
            "modules.script_callbacks": callbacks, "gradio": make_gradio()}


def load_script(path: Path, extension_root: Path):
    """scripts.load_scripts: module from file (not put in sys.modules), extension root on sys.path meanwhile."""
    saved = sys.path
    sys.path = [str(extension_root)] + sys.path
    try:
        spec = importlib.util.spec_from_file_location(path.name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path = saved
    base = sys.modules["modules.scripts"].Script
    classes = [c for c in module.__dict__.values() if isinstance(c, type) and issubclass(c, base) and c is not base]
    return module, classes


# ---------------------------------------------------------------- toy model


class ToyUNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x, sigma, cond):
        """Denoised estimate in σ-space: Gaussian-prior shrinkage plus a small learned-looking term."""
        s = sigma.view(-1, 1, 1, 1)
        c_in = 1 / (s**2 + SIGMA_DATA**2).sqrt()
        prior = x * SIGMA_DATA**2 / (SIGMA_DATA**2 + s**2)
        return prior + 0.2 * torch.tanh(self.conv(x * c_in)) + 0.05 * cond.reshape(x.shape[0], -1).mean(1).view(-1, 1, 1, 1)


class CompVisDenoiserLike(torch.nn.Module):
    """k_diffusion.external.CompVisDenoiser's role: inner_model(x, sigma, cond=...) -> denoised."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.sigma_min, self.sigma_max = 0.03, 14.6

    def forward(self, x, sigma, cond):
        return self.unet(x, sigma, cond["c_crossattn"][0])


class ToyDecoder(torch.nn.Module):
    """first_stage_model: decode(z) -> image in [-1, 1] at twice the latent size."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 12, 1)

    def decode(self, z):
        return torch.tanh(0.5 * F.pixel_shuffle(self.conv(z), 2))

    def process_out(self, z):  # Forge's first_stage_model converts the sampler's latent first
        return z / SdModel.scale_factor


class SdModel(torch.nn.Module):
    scale_factor = 0.5

    def __init__(self):
        super().__init__()
        self.unet = ToyUNet()
        self.model = types.SimpleNamespace(diffusion_model=self.unet, conditioning_key="crossattn")
        self.first_stage_model = ToyDecoder()
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    @torch.no_grad()
    def decode_first_stage(self, z):  # ldm's, decorated like the real one
        return self.first_stage_model.decode(z / self.scale_factor)


# ---------------------------------------------------------------- A1111 sampling


class CFGDenoiser(torch.nn.Module):
    """modules/sd_samplers_cfg_denoiser.py, reduced to what DPS meets: same forward signature."""

    def __init__(self, sampler, shared):
        super().__init__()
        self.inner_model = sampler.model_wrap
        self.sampler = sampler
        self.shared = shared
        self.mask = self.nmask = self.init_latent = None
        self.step = 0
        self.need_last_noise_uncond = False     # set by DDIM CFG++, which reads the unconditional output apart
        self.last_noise_uncond = None

    def get_pred_x0(self, x_in, x_out, sigma):
        return x_out

    def apply_blend(self, current):
        return current if self.mask is None else self.init_latent * self.mask + self.nmask * current

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if self.shared.state.interrupted:
            raise InterruptedException
        b = x.shape[0]
        x_in, sigma_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        x_out = torch.zeros_like(x_in)  # the host's batch_cond_uncond=False path: slice assignment
        x_out[:b] = self.inner_model(x_in[:b], sigma_in[:b], cond={"c_crossattn": [cond]})
        x_out[b:] = self.inner_model(x_in[b:], sigma_in[b:], cond={"c_crossattn": [uncond]})
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[b:])
        self.sampler.last_latent = self.get_pred_x0(x_in[:b], x_out[:b], sigma)
        self.shared.state.current_latent = self.sampler.last_latent  # store_latent(preview)
        denoised = x_out[b:] + cond_scale * (x_out[:b] - x_out[b:])
        denoised = self.apply_blend(denoised)
        self.step += 1
        return denoised


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None):
    """k_diffusion.sampling.sample_euler without churn."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None):
    """k_diffusion.sampling.sample_heun without churn: two denoiser calls per step."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1] * s_in, **extra_args)) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k_diffusion.sampling.sample_dpmpp_2m: DPM-Solver++(2M), h in −log σ."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * ((1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised)
        old_denoised = denoised
    return x


class KDiffusionSampler:
    """``same_condition``: the negative prompt's conditioning equal to the prompt's (a test's way to make the
    unconditional output the conditional one)."""

    def __init__(self, sd_model, shared, func=sample_euler, same_condition=False):
        self.same_condition = same_condition
        self.shared = shared
        self.model_wrap = CompVisDenoiserLike(sd_model.unet)
        self.model_wrap_cfg = CFGDenoiser(self, shared)
        self.func = func
        self.last_latent = None
        self.preview_had_grad = []

    def get_sigmas(self, p, steps):
        ramp = torch.linspace(0, 1, steps)
        rho = 7.0
        lo, hi = self.model_wrap.sigma_min ** (1 / rho), self.model_wrap.sigma_max ** (1 / rho)
        sigmas = (hi + ramp * (lo - hi)) ** rho  # Karras et al. 2022
        return torch.cat([sigmas, sigmas.new_zeros([1])])

    def callback_state(self, d):
        shared = self.shared
        self.preview_had_grad.append(bool(shared.state.current_latent.requires_grad
                                          or self.last_latent.requires_grad or d["denoised"].requires_grad))
        self.last_latent = d["denoised"]

    def extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning) -> dict:
        uncond = conditioning if self.same_condition else unconditional_conditioning
        return {"cond": conditioning, "image_cond": image_conditioning, "uncond": uncond, "cond_scale": p.cfg_scale,
                "s_min_uncond": 0.0}

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sigmas = self.get_sigmas(p, steps or p.steps)
        extra_args = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.func(self.model_wrap_cfg, x * sigmas[0], sigmas, extra_args=extra_args,
                         callback=self.callback_state)


class CFGDenoiserTimesteps(CFGDenoiser):
    """sd_samplers_timesteps.CFGDenoiserTimesteps: the model returns eps; x̂0 from ᾱ."""

    def __init__(self, sampler, shared, alphas_cumprod):
        super().__init__(sampler, shared)
        self.alphas = alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        a_t = self.alphas[sigma.to(dtype=int)][:, None, None, None]
        return (x_in - (1 - a_t).sqrt() * x_out) / a_t.sqrt()


class EpsFromDenoiser(torch.nn.Module):
    """CompVisTimestepsDenoiser's role: inner_model(x_t, t, cond) -> eps, from the σ-space toy UNet."""

    def __init__(self, unet, alphas_cumprod):
        super().__init__()
        self.unet, self.alphas = unet, alphas_cumprod

    def forward(self, x, t, cond):
        a = self.alphas[t.to(dtype=int)][:, None, None, None]
        sigma = ((1 - a) / a).sqrt().flatten()
        x0 = self.unet(x / a.sqrt(), sigma, cond["c_crossattn"][0])
        return (x - a.sqrt() * x0) / (1 - a).sqrt()


class DDIMSampler(KDiffusionSampler):
    """The WebUI's DDIM (sd_samplers_timesteps_impl.ddim, η = 0); ``same_condition``: the negative prompt's
    conditioning equal to the prompt's (a test's way to make the unconditional output the conditional one)."""

    def __init__(self, sd_model, shared, same_condition=False):
        self.same_condition = same_condition
        self.shared = shared
        self.model_wrap = EpsFromDenoiser(sd_model.unet, sd_model.alphas_cumprod)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self, shared, sd_model.alphas_cumprod)
        self.last_latent = None
        self.preview_had_grad = []

    @torch.no_grad()
    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        alphas = self.model_wrap_cfg.alphas
        timesteps = torch.linspace(999, 0, steps or p.steps).round().long()
        extra_args = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        s_in = x.new_ones([x.shape[0]])
        for i, t in enumerate(timesteps):
            a, a_prev = alphas[t], (alphas[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0))
            eps = self.model_wrap_cfg(x, t * s_in, **extra_args)
            x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            self.callback_state({"denoised": x0})
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * self.direction(eps)
        return x

    def direction(self, eps):
        return eps


class DDIMCFGPPSampler(DDIMSampler):
    """The WebUI's DDIM CFG++ (sd_samplers_timesteps_impl.ddim_cfgpp): x0 from the guided output, the direction to
    the noise from the unconditional one, which the CFG denoiser keeps when ``need_last_noise_uncond``."""

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        self.model_wrap_cfg.need_last_noise_uncond = True
        return super().sample(p, x, conditioning, unconditional_conditioning, steps, image_conditioning)

    def direction(self, eps):
        return self.model_wrap_cfg.last_noise_uncond


class Processing:
    """StableDiffusionProcessing's fields that the script reads."""

    def __init__(self, sd_model, width=32, height=32, steps=12, batch_size=1, seed=1, init_images=None,
                 image_mask=None, sampler_name="Euler"):
        self.sd_model, self.width, self.height, self.steps = sd_model, width, height, steps
        self.sampler_name = sampler_name
        self.batch_size, self.seed, self.cfg_scale = batch_size, seed, 2.0
        self.init_images, self.image_mask, self.inpainting_mask_invert = init_images, image_mask, 0
        self.extra_generation_params: dict = {}
        self.is_hr_pass = False
        self.sampler = None
        self.scripts = None
        self.resize_mode = 0


def create_infotext(p) -> dict:
    """processing.create_infotext: lists and callables are resolved, None values dropped."""
    out = {}
    for key, value in p.extra_generation_params.items():
        if callable(value):
            value = value(p=p)
        if value is not None:
            out[key] = value
    return out


class ScriptRunner:
    """modules.scripts.ScriptRunner's hooks as processing.py calls them (each script gets ``args``)."""

    def __init__(self, scripts, args):
        self.scripts, self.args = scripts, list(args)

    def process(self, p):
        for s in self.scripts:
            s.process(p, *self.args)

    def process_before_every_sampling(self, p, **kwargs):
        for s in self.scripts:
            s.process_before_every_sampling(p, *self.args, **kwargs)

    def postprocess(self, p, processed):
        for s in self.scripts:
            s.postprocess(p, processed, *self.args)


def run_processing(p, make_sampler, grad_mode=torch.no_grad, generator_seed=0):
    """processing.process_images_inner's order: scripts.process -> (grad mode: sampler, hook, sample,
    decode) -> scripts.postprocess. Returns a Processed-like namespace (image in [-1, 1], infotext dict)."""
    if p.scripts is not None:
        p.scripts.process(p)
    g = torch.Generator().manual_seed(generator_seed)
    with grad_mode():
        p.sampler = make_sampler(p)
        x = torch.randn(p.batch_size, 4, p.height // 2, p.width // 2, generator=g)
        c = torch.full((p.batch_size,), 1.0)
        uc = torch.zeros(p.batch_size)
        if p.scripts is not None:
            p.scripts.process_before_every_sampling(p, x=x, noise=x, c=c, uc=uc)
        samples = p.sampler.sample(p, x, c, uc)
        image = decode(p, samples)
    info = create_infotext(p)
    processed = types.SimpleNamespace(images=[image], info_dict=info,
                                      infotexts=[", ".join(f"{k}: {v}" for k, v in info.items())])
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed


def process_images(p, scripts, args, make_sampler, grad_mode=torch.no_grad, generator_seed=0):
    """Run ``scripts`` with ``args`` through the processing lifecycle; returns (image, infotext dict)."""
    p.scripts = ScriptRunner(scripts, args) if scripts else None
    processed = run_processing(p, make_sampler, grad_mode, generator_seed)
    return processed.images[0], processed.info_dict


def decode(p, samples):
    forge = getattr(p.sd_model, "forge_objects", None)
    if forge is not None:
        with torch.inference_mode():
            return forge.vae.first_stage_model.decode(forge.vae.first_stage_model.process_out(samples))
    return p.sd_model.decode_first_stage(samples)


# ---------------------------------------------------------------- Forge


class UnetPatcher:
    """backend/patcher/base.py ModelPatcher's API as used by post-CFG extensions."""

    def __init__(self, model):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}

    def clone(self):
        n = UnetPatcher(self.model)
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = (
            self.model_options.get("sampler_post_cfg_function", []) + [post_cfg_function])


class ForgeVAE:
    def __init__(self, first_stage_model):
        self.first_stage_model = first_stage_model


class ForgeSdModel(SdModel):
    def __init__(self):
        with torch.inference_mode():  # backend/loader.py forge_loader is @torch.inference_mode()
            super().__init__()
        self.base_unet = UnetPatcher(CompVisDenoiserLike(self.unet))
        self.forge_objects_original = types.SimpleNamespace(unet=self.base_unet, vae=ForgeVAE(self.first_stage_model))
        self.forge_objects = copy.copy(self.forge_objects_original)


class ForgeCFGDenoiser(CFGDenoiser):
    """Forge's CFGDenoiser.forward -> sampling_function: cond/uncond, CFG, then post-CFG functions."""

    def __init__(self, sampler, shared, sd_model):
        super().__init__(sampler, shared)
        self.sd_model = sd_model

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        unet = self.sd_model.forge_objects.unet
        model = unet.model
        cond_pred = model(x, sigma, cond={"c_crossattn": [cond]})
        uncond_pred = model(x, sigma, cond={"c_crossattn": [uncond]})
        denoised = uncond_pred + cond_scale * (cond_pred - uncond_pred)
        for fn in unet.model_options.get("sampler_post_cfg_function", []):
            args = {"denoised": denoised, "cond": cond, "uncond": uncond, "model": model,
                    "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": sigma,
                    "model_options": unet.model_options, "input": x}
            denoised = fn(args)
        if self.need_last_noise_uncond:        # after the post-CFG functions, from the same tensor
            self.last_noise_uncond = (x - uncond_pred) / sigma[:, None, None, None]
        self.sampler.last_latent = cond_pred
        self.shared.state.current_latent = cond_pred
        self.step += 1
        return denoised


class ForgeSampler(KDiffusionSampler):
    def __init__(self, sd_model, shared, func=sample_euler, same_condition=False):
        super().__init__(sd_model, shared, func, same_condition)
        self.model_wrap_cfg = ForgeCFGDenoiser(self, shared, sd_model)


@torch.no_grad()
def sample_euler_cfg_pp(model, x, sigmas, extra_args=None, callback=None):
    """Euler with CFG++'s split (as Forge's DDIM CFG++ does it in ᾱ): x0 from the guided output, the direction to
    the noise from the unconditional one, ``last_noise_uncond`` of the CFG denoiser."""
    model.need_last_noise_uncond = True
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = denoised + sigmas[i + 1] * model.last_noise_uncond
    return x


def forge_process_images(p, scripts, args, generator_seed=0, func=sample_euler, same_condition=False):
    """Forge: forge_objects are reset before every sampling; everything runs under inference mode."""
    p.sd_model.forge_objects = copy.copy(p.sd_model.forge_objects_original)
    shared = sys.modules["modules.shared"]
    return process_images(p, scripts, args, lambda p_: ForgeSampler(p_.sd_model, shared, func, same_condition),
                          grad_mode=torch.inference_mode, generator_seed=generator_seed)


@contextlib.contextmanager
def nothing():
    yield
