"""The ComfyUI adapter (nodes/hook.py, nodes/builders.py) against small fakes of ComfyUI's hook surface.

The fakes follow the documented signatures: a PREDICT_NOISE wrapper is ``fn(executor, x, sigma, model_options,
seed)`` with ``executor.class_obj`` the guider (``inner_model`` with ``model_sampling``, ``process_latent_out``;
``loaded_models``; ``model_patcher``); an OUTER_SAMPLE wrapper is ``fn(executor, noise, latent_image, sampler,
sigmas, denoise_mask, callback, disable_pbar, seed)``. Everything runs under ``torch.inference_mode()`` with
weights created inside it, as ComfyUI does, which reproduces "Inference tensors cannot be saved for backward".
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import math
import re
import sys
import warnings

import pytest
import torch
from torch import nn

from conftest import ROOT

PACK = "dps_guidance_pack_test"


def _load_pack():
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    return (importlib.import_module(f"{PACK}.nodes.hook"), importlib.import_module(f"{PACK}.nodes.builders"),
            importlib.import_module(f"{PACK}.dps"))


hook, builders, dps = _load_pack()
ops = dps.operators
Settings = hook.Settings


# ---- fakes of ComfyUI's objects --------------------------------------------------------------------------
class Executor:
    """comfy.patcher_extension.WrapperExecutor, reduced: calls the next wrapper, finally the original."""

    def __init__(self, fn, class_obj, wrappers, idx=0):
        self.fn, self.class_obj, self.wrappers, self.idx = fn, class_obj, wrappers, idx

    def __call__(self, *args, **kwargs):
        if self.idx < len(self.wrappers):
            return self.wrappers[self.idx](Executor(self.fn, self.class_obj, self.wrappers, self.idx + 1),
                                           *args, **kwargs)
        return self.fn(*args, **kwargs)


class LatentFormat:
    def __init__(self, channels=4, scale=0.5, shift=0.1, dims=2):
        self.latent_channels, self.scale_factor, self.shift, self.latent_dimensions = channels, scale, shift, dims

    def process_out(self, x):
        return x / self.scale_factor + self.shift


class ModelSampling:
    sigma_max, sigma_min = 14.6, 0.03

    def percent_to_sigma(self, p):
        if p <= 0:
            return 999999999.9
        if p >= 1:
            return 0.0
        return math.exp(math.log(self.sigma_max) * (1 - p) + math.log(self.sigma_min) * p)


class Control(nn.Module):
    """Stands in for a ControlNet: extra weights (inference tensors) used in the forward."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return 0.05 * self.conv(x)


class Inner(nn.Module):
    """BaseModel: ``apply_model`` returns x̂0; a Gaussian-prior denoiser plus a small learned part."""

    def __init__(self, channels=4, fmt=None):
        super().__init__()
        self.diffusion_model = nn.Sequential(nn.Conv2d(channels, 16, 3, padding=1), nn.SiLU(),
                                             nn.Conv2d(16, channels, 3, padding=1))
        self.model_sampling = ModelSampling()
        self.latent_format = fmt or LatentFormat(channels)
        self.control: Control | None = None

    def process_latent_out(self, x):
        return self.latent_format.process_out(x)

    def apply_model(self, x, sigma, cond_scale=1.0):
        s = sigma.view(-1, 1, 1, 1)
        h = self.diffusion_model(x / (s**2 + 1).sqrt())
        if self.control is not None:
            # As ComfyUI's UNet adds ControlNet residuals: in place (``h += ctrl``), into an activation that
            # an earlier op (here the square) saved for backward; autograd refuses that unless told otherwise.
            saved = h.square()
            h += self.control(x)
            h = h + 0.0 * saved
        return x / (1 + s**2) + 0.1 * torch.tanh(h) * cond_scale


class Patcher:
    """ModelPatcher, reduced to what the node uses."""

    def __init__(self, model):
        self.model = model
        self.wrappers: dict[str, dict[str, list]] = {}
        self.additional: dict[str, list] = {}

    def clone(self):
        c = Patcher(self.model)
        c.wrappers = {t: {k: list(v) for k, v in d.items()} for t, d in self.wrappers.items()}
        c.additional = dict(self.additional)
        return c

    def add_wrapper_with_key(self, wrapper_type, key, fn):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(fn)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def set_additional_models(self, key, models):
        self.additional[key] = models

    def get_model_object(self, name):
        return getattr(self.model, name)

    def all(self, wrapper_type):
        return [fn for fns in self.wrappers.get(wrapper_type, {}).values() for fn in fns]


class Guider:
    """CFGGuider: ``__call__`` goes through PREDICT_NOISE wrappers; ``predict_noise`` does CFG over two calls, then
    the post-CFG functions of ``model_options`` (comfy.samplers.sampling_function's arguments); ``model_options``
    are the guider's own (the model's), which the sampler receives and may add to (CFG++)."""

    def __init__(self, patcher, cfg=2.0, extra_models=(), uncond_scale=0.5, post_cfg=()):
        self.model_patcher, self.inner_model, self.cfg = patcher, patcher.model, cfg
        self.loaded_models = list(extra_models)
        self.uncond_scale = uncond_scale
        self.model_options = {"sampler_post_cfg_function": list(post_cfg)}

    def predict_noise(self, x, sigma, model_options, seed):
        cond = self.inner_model.apply_model(x, sigma, 1.0)
        uncond = self.inner_model.apply_model(x, sigma, self.uncond_scale)
        out = uncond + (cond - uncond) * self.cfg
        for fn in model_options.get("sampler_post_cfg_function", []):
            out = fn({"denoised": out, "cond_denoised": cond, "uncond_denoised": uncond, "input": x, "sigma": sigma,
                      "model_options": model_options})
        return out

    def __call__(self, x, sigma, model_options, seed):
        return Executor(self.predict_noise, self, self.model_patcher.all(hook.PREDICT_NOISE))(x, sigma, model_options, seed)

    def sample(self, noise, latent, sampler, sigmas, seed=0):
        def outer(noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False, seed=None):
            x = noise * sigmas[0] + latent_image
            opts = {**self.model_options, "transformer_options": {"sample_sigmas": sigmas}}

            def model(x_, s_, model_options=None):
                return self(x_, s_, opts if model_options is None else model_options, seed)

            model.model_options = opts     # what a sampler gets as extra_args["model_options"]
            return sampler(model, x, sigmas)

        return Executor(outer, self, self.model_patcher.all(hook.OUTER_SAMPLE))(noise, latent, sampler, sigmas, None,
                                                                                None, True, seed)


@torch.no_grad()
def euler(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def dpmpp_2m(model, x, sigmas):
    s_in = x.new_ones(x.shape[0])
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
            break
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old is None:
            d = denoised
        else:
            r = (t - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * d
        old = denoised
    return x


@torch.no_grad()
def euler_cfg_pp(model, x, sigmas, seen=None):
    """ComfyUI's ``sample_euler_cfg_pp``: x0 from the guided prediction, the noise direction from the unconditional
    one, read through a post-CFG function the sampler adds to its copy of the model options."""
    unconditional = {}

    def post_cfg_function(args):
        unconditional["denoised"] = args["uncond_denoised"]
        return args["denoised"]

    options = dict(model.model_options)
    options["sampler_post_cfg_function"] = options.get("sampler_post_cfg_function", []) + [post_cfg_function]
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, model_options=options)
        if seen is not None:
            seen.append((denoised.clone(), unconditional["denoised"].clone()))
        x = denoised + sigmas[i + 1] * (x - unconditional["denoised"]) / sigmas[i]
    return x


class FirstStage(nn.Module):
    """The VAE's module: latent (C, h, w) → image (3, 8h, 8w) in about [-1, 1]."""

    def __init__(self, channels=4, poison=False):
        super().__init__()
        self.proj = nn.Conv2d(channels, 3, 1)
        self.poison = poison

    def decode(self, z):
        img = torch.tanh(self.proj(nn.functional.interpolate(z, scale_factor=8, mode="bilinear")))
        return img * float("nan") if self.poison else img


class Surrogate(nn.Module):
    """A TAESD-like decoder: model-space latent in, image in [0, 1] out."""

    def __init__(self, first_stage, fmt):
        super().__init__()
        self.first_stage, self.fmt = first_stage, fmt

    def forward(self, z):
        return (self.first_stage.decode(self.fmt.process_out(z)) + 1) / 2


class VAE:
    def __init__(self, channels=4, dtype=torch.float32, poison=False, latent_dim=2):
        self.first_stage_model = FirstStage(channels, poison).to(dtype)
        self.vae_dtype, self.latent_channels, self.downscale_ratio, self.latent_dim = dtype, channels, 8, latent_dim
        self.patcher = object()


STRONG = dict(zeta=3.0, rule="dps")   # the constant rule at a strength fitted to this toy (6 steps)
SIGMAS = torch.tensor([14.6, 6.0, 2.5, 1.0, 0.4, 0.15, 0.0])


def world(channels=4, vae_dtype=torch.float32, poison=False, control=False, fmt=None):
    """Model, VAE and a clean picture, all made under inference mode (as ComfyUI loads them)."""
    with torch.inference_mode():
        torch.manual_seed(0)
        inner = Inner(channels, fmt)
        if control:
            inner.control = Control(channels)
        vae = VAE(channels, vae_dtype, poison)
        z_true = torch.randn(1, channels, 4, 4)
        clean = vae.first_stage_model.decode(inner.process_latent_out(z_true).to(vae_dtype)).float()
    return Patcher(inner), vae, clean


def as_image(x_nchw):
    return ((x_nchw + 1) / 2).movedim(1, -1)


def run(patcher, vae, sampler=euler, batch=1, seed=1, extra_models=(), **guider_options):
    """Sample under inference mode; returns the decoded images in [-1, 1]."""
    with torch.inference_mode():
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(batch, patcher.model.latent_format.latent_channels, 4, 4, generator=g)
        guider = Guider(patcher, extra_models=extra_models, **guider_options)
        latent = guider.sample(noise, torch.zeros_like(noise), sampler, SIGMAS)
        fsm = vae.first_stage_model
        return fsm.decode(patcher.model.process_latent_out(latent).to(vae.vae_dtype)).float()


def residual(operator, y, images):
    with torch.inference_mode():
        return (operator(images) - y).flatten(1).norm(dim=1)


def setup_sr(noise_sigma=0.0, **kw):
    patcher, vae, clean = world(**kw)
    with torch.inference_mode():
        operator = ops.SuperResolution(factor=4)
        noise = dps.noise.Gaussian(noise_sigma)
        measurement = builders.measure(as_image(clean), operator, noise, seed=0)
    return patcher, vae, clean, operator, noise, measurement


# ---- tests ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", [euler, dpmpp_2m], ids=["euler", "dpmpp_2m"])
@pytest.mark.parametrize("rule,mode", [("dps", "full"), ("schedule", "full"), ("dps", "x0_only"),
                                       ("polyak", "full"), ("polyak", "x0_only")])
def test_guidance_lowers_the_measurement_residual(sampler, rule, mode):
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    # "polyak" at the node's default strength; the constant rules need a strength fitted to this toy.
    zeta = {"dps": 3.0, "schedule": 10.0, "polyak": Settings().zeta}[rule]
    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(zeta=zeta, rule=rule, mode=mode))
    plain = residual(operator, y, run(patcher, vae, sampler))
    dps_res = residual(operator, y, run(guided, vae, sampler))
    assert torch.isfinite(dps_res).all()
    assert float(dps_res) < 0.6 * float(plain), (float(dps_res), float(plain))
    distances = patch.last_run.distances
    assert len(distances) == len(SIGMAS) - 1 and float(distances[-1][0]) < float(distances[0][0])


def test_cfg_pp_sampler_gets_the_correction_in_both_predictions():
    """A CFG++ sampler reads the unconditional prediction through a post-CFG function of its own; the node feeds it
    the correction too, so the x-update receives it as Euler's does (dps.samplers): with the unconditional
    prediction equal to the conditional one, guided euler_cfg_pp is guided euler. A user's post-CFG function runs
    once per evaluation, inside it, as without guidance."""
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    calls = []

    def user_post_cfg(args):
        calls.append(args["sigma"])
        return args["denoised"]

    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings())
    seen = []
    same = dict(uncond_scale=1.0, post_cfg=[user_post_cfg])
    reference = run(guided, vae, euler, **same)
    assert len(calls) == len(SIGMAS) - 1
    cfg_pp = run(guided, vae, functools.partial(euler_cfg_pp, seen=seen), **same)
    assert len(calls) == 2 * (len(SIGMAS) - 1)
    assert all(torch.allclose(denoised, unconditional, atol=1e-6) for denoised, unconditional in seen)
    assert torch.allclose(cfg_pp, reference, atol=1e-5), float((cfg_pp - reference).abs().max())
    # with classifier-free guidance proper (the two predictions differ) the residual still falls
    plain = residual(operator, y, run(patcher, vae, euler_cfg_pp))
    assert float(residual(operator, y, run(guided, vae, euler_cfg_pp))) < 0.6 * float(plain)


def test_zero_strength_leaves_the_output_unchanged():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode():
        off, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(zeta=0.0))
    assert torch.equal(run(patcher, vae), run(off, vae))
    assert patch.last_run.distances == []


def test_start_end_window_outside_the_schedule_is_a_no_op():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode():
        late, patch = hook.apply_dps(patcher, vae, measurement, operator, noise,
                                     Settings(zeta=1.0, start_percent=0.999, end_percent=1.0))
    assert torch.equal(run(patcher, vae), run(late, vae))


def test_inference_weights_fail_without_the_adapter_and_later_plain_runs_still_work():
    patcher, vae, clean, operator, noise, measurement = setup_sr(control=True)
    inner = patcher.model
    assert all(p.is_inference() for p in inner.parameters())
    guidance = dps.DPSGuidance(operator, noise, torch.zeros(1, 3, 8, 8))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        x = torch.randn(1, 4, 4, 4)
        guidance.evaluate(x, lambda x_: inner.apply_model(x_, torch.ones(1)))
    before = run(patcher, vae)
    with torch.inference_mode():
        guided, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings())
    run(guided, vae)
    assert not any(p.is_inference() for p in inner.parameters())       # the ControlNet-like part too
    after = run(patcher, vae)                                           # the same model, unpatched, next prompt
    torch.testing.assert_close(before, after, rtol=0, atol=0)


def test_per_sample_residuals_with_a_batch():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(**STRONG))
    plain = residual(operator, y, run(patcher, vae, batch=3))
    dps_res = residual(operator, y, run(guided, vae, batch=3))
    assert dps_res.shape == (3,) and bool((dps_res < 0.6 * plain).all())
    assert patch.last_run.distances[0].shape == (3,)


def test_patch_lives_on_a_clone_and_is_not_stacked():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode():
        once, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings())
        twice, _ = hook.apply_dps(once, vae, measurement, operator, noise, Settings())
    assert patcher.wrappers == {} and patcher.additional == {}
    for wrapper_type in (hook.PREDICT_NOISE, hook.OUTER_SAMPLE):
        assert len(twice.wrappers[wrapper_type]["dps"]) == 1
    assert twice.additional["dps_vae"] == [vae.patcher]


def test_decode_undoes_the_latent_format():
    patcher, vae, clean, operator, noise, measurement = setup_sr(fmt=LatentFormat(scale=0.25, shift=-0.3))
    with torch.inference_mode():
        _, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings())
        patch._inner = patcher.model
        z = torch.randn(1, 4, 4, 4)
        expected = vae.first_stage_model.decode(z / 0.25 - 0.3)
        torch.testing.assert_close(patch._decode(z), expected)


def test_fp32_decode_of_a_bf16_vae_and_the_shared_vae_is_untouched():
    patcher, vae, clean, operator, noise, measurement = setup_sr(vae_dtype=torch.bfloat16)
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(precision="fp32", **STRONG))
    plain = residual(operator, y, run(patcher, vae))
    dps_res = residual(operator, y, run(guided, vae))
    assert float(dps_res) < 0.6 * float(plain)
    assert all(p.dtype == torch.bfloat16 for p in vae.first_stage_model.parameters())
    assert all(p.dtype == torch.float32 for p in patch.last_run.decoder_copy.parameters())


def test_surrogate_decoder_is_used_instead_of_the_vae():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        # A "TAESD" that takes model-space latents and returns [0, 1]: the VAE's module in disguise.
        surrogate = Surrogate(vae.first_stage_model, patcher.model.latent_format)
        broken = VAE(poison=True)                                  # would give NaN if it were used
        guided, _ = hook.apply_dps(patcher, broken, measurement, operator, noise, Settings(**STRONG), surrogate=surrogate)
    assert "dps_vae" not in guided.additional
    assert float(residual(operator, y, run(guided, vae))) < 0.6 * float(residual(operator, y, run(patcher, vae)))


def test_measurement_that_does_not_fit_the_latent_is_refused_before_sampling():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    calls = []
    with torch.inference_mode():
        wrong = torch.zeros(1, 16, 16, 3)                          # SR x4 of a 32x32 image is 8x8
        guided, _ = hook.apply_dps(patcher, vae, wrong, operator, noise, Settings())
        guided.add_wrapper_with_key(hook.PREDICT_NOISE, "spy", lambda ex, *a: calls.append(1) or ex(*a))
    with pytest.raises(ValueError, match="Resize the measurement to 8x8"):
        run(guided, vae)
    assert calls == []


def test_mask_of_the_wrong_size_is_a_node_error():
    patcher, vae, clean, _, noise, measurement = setup_sr()
    with torch.inference_mode():
        image = as_image(clean)                                    # 32x32
        operator = builders.inpainting(builders.box_mask(24, 24, 8, 8, 2, seed=0))
        with pytest.raises(ValueError, match="mask is 24x24 but the measurement image is 32x32"):
            hook.apply_dps(patcher, vae, image, operator, noise, Settings())


def test_inpainting_restores_the_measured_pixels():
    patcher, vae, clean, _, noise, _ = setup_sr()
    with torch.inference_mode():
        mask = builders.box_mask(32, 32, 12, 12, 2, seed=3)
        operator = builders.inpainting(mask)
        measurement = builders.measure(as_image(clean), operator, noise, seed=0)
        guided, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(**STRONG))
    y = measurement.movedim(-1, 1) * 2 - 1
    assert float(residual(operator, y, run(guided, vae))) < 0.6 * float(residual(operator, y, run(patcher, vae)))


def test_vae_with_other_latent_channels_is_a_node_error():
    patcher, _, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode(), pytest.raises(ValueError, match="VAE has 16 latent channels but the model uses 4"):
        hook.apply_dps(patcher, VAE(channels=16), measurement, operator, noise, Settings())


def test_video_model_is_a_node_error():
    patcher, vae, clean, operator, noise, measurement = setup_sr(fmt=LatentFormat(dims=3))
    with torch.inference_mode(), pytest.raises(ValueError, match="video"):
        hook.apply_dps(patcher, vae, measurement, operator, noise, Settings())


def test_non_finite_gradient_stops_with_advice():
    patcher, _, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode():
        guided, _ = hook.apply_dps(patcher, VAE(poison=True), measurement, operator, noise, Settings())
    with pytest.raises(dps.GuidanceDivergedError, match="Lower zeta"):
        run(guided, VAE())


def test_interrupt_stops_at_the_next_guided_step():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    calls = []

    class Interrupted(Exception):
        pass

    def interrupt():
        calls.append(1)
        if len(calls) > 2:
            raise Interrupted

    with torch.inference_mode():
        guided, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(), interrupt=interrupt)
    with pytest.raises(Interrupted):
        run(guided, vae)
    assert len(calls) == 3


def test_progress_lines_report_the_falling_residual():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    lines = []
    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(), report=lines.append)
    run(guided, vae)
    distances, refined = patch.last_run.distances, patch.last_run.refined
    assert len(lines) == len(distances) + 1 == len(SIGMAS) and len(refined) == 1   # + the last step's refinement
    pattern = re.compile(r"DPS: measurement residual ‖y − A\(x̂0\)‖ (\S+)( after the last step's refinement)?, "
                         r"from (\S+) \((\d+) guided evaluations?\)$")
    assert all(pattern.match(line) for line in lines), lines
    assert [bool(pattern.match(line).group(2)) for line in lines] == [False] * len(distances) + [True]
    last, _, first, count = pattern.match(lines[-2]).groups()
    assert int(count) == len(distances)
    assert float(last) == pytest.approx(float(distances[-1][0]), rel=1e-3)
    assert float(first) == pytest.approx(float(distances[0][0]), rel=1e-3) and float(last) < float(first)
    final = float(pattern.match(lines[-1]).group(1))
    assert final == pytest.approx(float(refined[0][0]), rel=1e-3) and final <= float(last)


def test_out_of_memory_through_the_unet_falls_back_to_x0_only_and_the_run_finishes(caplog):
    """A UNet whose backward does not fit (SDXL at 1024 px on a 12-16 GB card) makes the node guide through
    the VAE only: the run finishes guided, the log says it once, the node's progress line says it."""
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    lines, graph_calls = [], []

    def hungry(executor, x, *args):
        if x.requires_grad:
            graph_calls.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return executor(x, *args)

    with torch.inference_mode():
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(mode="full"),
                                       report=lines.append)
        guided.add_wrapper_with_key(hook.PREDICT_NOISE, "hungry", hungry)
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = run(guided, vae)
    y = measurement.movedim(-1, 1) * 2 - 1
    assert graph_calls == [1]
    assert float(residual(operator, y, out)) < float(residual(operator, y, run(patcher, vae)))
    assert sum("out of memory" in r.message for r in caplog.records) == 1
    assert all(line.endswith("gradient x0_only after running out of memory") for line in lines)


def test_measure_preview_is_a_viewable_picture():
    picture = torch.rand(1, 8, 8, 3)
    noisy = picture + 0.1 * torch.randn_like(picture)
    assert torch.equal(builders.preview(noisy), noisy.clamp(0, 1))
    fourier = torch.rand(2, 8, 8, 3) * 50 + torch.arange(2).view(2, 1, 1, 1) * 100
    shown = builders.preview(fourier)
    assert shown.shape == fourier.shape
    for i in range(2):
        assert float(shown[i].min()) == 0.0 and float(shown[i].max()) == pytest.approx(1.0)


def test_bad_settings_and_sockets_name_the_fix():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    with pytest.raises(ValueError, match="start_percent <= end_percent"):
        Settings(start_percent=0.8, end_percent=0.2)
    with pytest.raises(ValueError, match="DPS operator node"):
        hook.apply_dps(patcher, vae, measurement, "bicubic", noise, Settings())
    with pytest.raises(ValueError, match="kernel image is 4x4"):
        builders.build_operator(ops.registry.get("motion_blur"), {"kernel": torch.ones(1, 4, 4, 3)})


def test_measure_node_values():
    with torch.inference_mode():
        image = torch.rand(2, 32, 48, 3)
        y = builders.measure(image, builders.compose(ops.Grayscale(), ops.SuperResolution(factor=2)),
                             dps.noise.Gaussian(0.0), seed=0)
        mask = builders.random_mask(48, 32, 0.5, seed=1)
        op = builders.inpainting(mask)
    assert y.shape == (2, 16, 24, 3) and torch.equal(y[..., 0], y[..., 1])
    assert mask.shape == (1, 32, 48) and float(mask.mean()) == pytest.approx(0.5, abs=1 / (32 * 48))
    assert op.mask.shape[-2:] == (32, 48)


def test_example_workflows_wire_dps_into_a_sampler():
    import comfy_workflows                       # UI format (the template browser's); as the API prompt it sends
    paths = sorted((ROOT / "example_workflows").glob("*.json"))
    names = " ".join(p.name for p in paths)
    for task in ("super_resolution", "inpainting", "deblur_controlnet", "storyboard"):
        assert task in names
    info = comfy_workflows.load_info()
    for path, ui in zip(paths, comfy_workflows.load_workflows().values()):
        workflow = comfy_workflows.ui_to_api(ui, info)
        for node in workflow.values():
            for value in node["inputs"].values():
                if isinstance(value, list):
                    assert value[0] in workflow, (path.name, value)
        applies = [k for k, v in workflow.items() if v["class_type"] == "DPSApply"]
        assert applies and any(v["class_type"] == "KSampler" and v["inputs"]["model"][0] in applies
                               for v in workflow.values()), path.name


def test_x0_only_leaves_the_unet_weights_alone():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        guided, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(mode="x0_only", **STRONG))
    assert float(residual(operator, y, run(guided, vae))) < 0.6 * float(residual(operator, y, run(patcher, vae)))
    assert all(p.is_inference() for p in patcher.model.parameters())          # no copy of the UNet was needed
    assert not any(p.is_inference() for p in vae.first_stage_model.parameters())


@pytest.mark.parametrize("vae_gradient,vae_tile", [("full", 0), ("checkpointed", 0), ("tiled", 16), ("auto", 0)])
def test_every_vae_gradient_mode_guides(vae_gradient, vae_tile):
    """The memory-bounded modes (dps.vae_gradient) in the node: exact ones give the full mode's image."""
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    y = measurement.movedim(-1, 1) * 2 - 1
    with torch.inference_mode():
        full, _ = hook.apply_dps(patcher, vae, measurement, operator, noise, Settings(vae_gradient="full", **STRONG))
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise,
                                       Settings(vae_gradient=vae_gradient, vae_tile=vae_tile, **STRONG))
    out = run(guided, vae)
    assert float(residual(operator, y, out)) < 0.6 * float(residual(operator, y, run(patcher, vae)))
    plan = patch.last_run.guidance.decoder_gradient.plans[(1, 4, 4, 4)]
    assert plan.mode == ("full" if vae_gradient == "auto" else vae_gradient)   # a 32 px image fits any budget
    if vae_gradient != "tiled":
        torch.testing.assert_close(out, run(full, vae), rtol=1e-5, atol=1e-5)
    else:
        assert plan.tile == 2


def test_fast_decoder_hands_over_to_the_vae():
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    calls = []
    with torch.inference_mode():
        own = FirstStage()
        own.load_state_dict(vae.first_stage_model.state_dict())
        surrogate = Surrogate(own, patcher.model.latent_format)
        surrogate.register_forward_hook(lambda *a: calls.append("fast"))
        guided, patch = hook.apply_dps(patcher, vae, measurement, operator, noise,
                                       Settings(fast_decoder_end=0.5, **STRONG), surrogate=surrogate)
    original = vae.first_stage_model.decode
    vae.first_stage_model.decode = lambda z: calls.append("vae") or original(z)
    run(guided, vae)
    guided_calls = [c for c in calls if c in ("fast", "vae")][:-1]   # the last "vae" is run()'s own decode
    assert guided_calls[0] == "fast" and guided_calls[-1] == "vae"
    assert guided_calls == sorted(guided_calls)                         # fast first, then the VAE, no going back
    assert guided.additional["dps_vae"] == [vae.patcher]


def test_bad_vae_gradient_settings_are_refused():
    with pytest.raises(ValueError, match="vae_gradient must be one of"):
        Settings(vae_gradient="tiles")
    with pytest.raises(ValueError, match="fast_decoder_end"):
        Settings(fast_decoder_end=1.5)
    patcher, vae, clean, operator, noise, measurement = setup_sr()
    with torch.inference_mode():
        guided, _ = hook.apply_dps(patcher, vae, measurement, operator, noise,
                                   Settings(vae_gradient="tiled", vae_tile=512, **STRONG))
    with pytest.raises(ValueError, match="larger than the latent"):
        run(guided, vae)
