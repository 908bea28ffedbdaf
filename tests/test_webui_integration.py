"""Checks against a real Stable Diffusion WebUI; skipped without one.

* ``WEBUI_PATH``: an AUTOMATIC1111 or Forge checkout. The host contracts the script and its fakes
  (tests/fakes/webui_host.py) rely on are checked in the host's own source, without importing it (the
  WebUI cannot be imported outside its launcher).
* ``WEBUI_URL`` in addition (e.g. http://127.0.0.1:7860): a WebUI started with ``--api`` and this
  repository in its ``extensions/``. A tiny txt2img goes through the API with and without DPS (passed
  as ``alwayson_scripts``); the infotext must carry the settings and the guided image must fit the
  measurement better. Needs PIL (the WebUI's own environment has it).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

WEBUI_PATH = os.environ.get("WEBUI_PATH")
WEBUI_URL = os.environ.get("WEBUI_URL")
pytestmark = pytest.mark.skipif(
    not WEBUI_PATH, reason="no WebUI: set WEBUI_PATH to an AUTOMATIC1111 or Forge checkout (and WEBUI_URL to a "
                           "running one started with --api, this repository in its extensions/) to run these")


def _root() -> Path:
    root = Path(WEBUI_PATH)
    if not (root / "modules" / "scripts.py").exists():
        pytest.fail(f"WEBUI_PATH={root} is not a WebUI checkout (no modules/scripts.py)")
    return root


def _is_forge(root: Path) -> bool:
    return (root / "backend").is_dir()


def _class(root: Path, relative: str, name: str) -> ast.ClassDef:
    tree = ast.parse((root / relative).read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    pytest.fail(f"class {name} not found in {relative}: the host changed; update scripts/dps_guidance.py")


def _method_args(cls: ast.ClassDef, name: str) -> list[str]:
    for node in cls.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return [a.arg for a in node.args.args]
    pytest.fail(f"{cls.name}.{name} not found: the host changed; update scripts/dps_guidance.py")


def test_script_api_the_extension_uses():
    root = _root()
    script = _class(root, "modules/scripts.py", "Script")
    assert _method_args(script, "process_before_every_sampling") == ["self", "p"]
    assert _method_args(script, "process") == ["self", "p"]
    assert _method_args(script, "postprocess") == ["self", "p", "processed"]
    source = (root / "modules" / "scripts.py").read_text(encoding="utf-8")
    assert "AlwaysVisible = object()" in source
    assert "class InputAccordion" in (root / "modules" / "ui_components.py").read_text(encoding="utf-8")
    assert "callable(value)" in (root / "modules" / "processing.py").read_text(encoding="utf-8"), \
        "callable extra_generation_params (the DPS note/error) need create_infotext to call them"
    assert "callable(key)" in (root / "modules" / "infotext_utils.py").read_text(encoding="utf-8"), \
        "infotext_fields with callables (paste-back of the compound DPS value)"


def test_sampler_contracts_the_hooks_rely_on():
    root = _root()
    denoiser = _class(root, "modules/sd_samplers_cfg_denoiser.py", "CFGDenoiser")
    assert _method_args(denoiser, "forward") == ["self", "x", "sigma", "uncond", "cond", "cond_scale",
                                                 "s_min_uncond", "image_cond"]
    assert _method_args(_class(root, "modules/sd_samplers_kdiffusion.py", "KDiffusionSampler"), "get_sigmas") == \
        ["self", "p", "steps"]
    if _is_forge(root):
        base = (root / "backend" / "patcher" / "base.py").read_text(encoding="utf-8")
        assert "def set_model_sampler_post_cfg_function" in base and "copy.deepcopy(self.model_options)" in base
        sampling = (root / "backend" / "sampling" / "sampling_function.py").read_text(encoding="utf-8")
        for key in ('"denoised"', '"sigma"', '"input"', "sampler_post_cfg_function"):
            assert key in sampling, key
        assert "def process_out" in (root / "backend" / "nn" / "vae.py").read_text(encoding="utf-8")
    else:
        timesteps = _class(root, "modules/sd_samplers_timesteps.py", "CFGDenoiserTimesteps")
        assert _method_args(timesteps, "get_pred_x0") == ["self", "x_in", "x_out", "sigma"]
        assert "self.alphas = " in ast.unparse(timesteps)
        assert "def is_enabled(sd_model)" in (root / "modules" / "lowvram.py").read_text(encoding="utf-8")
        assert "self.sampler.last_latent = " in ast.unparse(denoiser)


def test_no_module_name_collides_with_the_host_or_other_extensions():
    root = _root()
    ours = Path(__file__).resolve().parents[1]
    for name in ("dps", "dps_webui"):
        assert not (root / name).exists() and not (root / f"{name}.py").exists(), f"the host has a top-level {name}"
        for folder in ("extensions", "extensions-builtin"):
            for other in (root / folder).glob(f"*/{name}"):
                if other.parent.resolve() != ours:
                    pytest.fail(f"{other} would shadow (or be shadowed by) this extension's {name} package")


def _post(path: str, payload: dict) -> dict:
    request = urllib.request.Request(WEBUI_URL.rstrip("/") + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.loads(response.read())


def test_live_txt2img_through_the_api():
    if not WEBUI_URL:
        pytest.skip("set WEBUI_URL to a WebUI started with --api (this repository in its extensions/) for the live run")
    Image = pytest.importorskip("PIL.Image", reason="the live run decodes PNGs with PIL")
    import numpy as np

    from dps.operators import SuperResolution

    size, factor = 64, 4
    rng = np.random.default_rng(0)
    low = (rng.random((size // factor, size // factor, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(low).save(buffer, format="PNG")
    measurement = base64.b64encode(buffer.getvalue()).decode()
    base = {"prompt": "a photo", "steps": 6, "width": size, "height": size, "seed": 1, "sampler_name": "Euler",
            "cfg_scale": 5}
    settings = {"enabled": True, "task": "super_resolution", "sr_factor": factor, "source": "upload",
                "image": measurement, "zeta": 5.0, "noise": "gaussian", "noise_sigma": 0.01}
    try:
        plain = _post("/sdapi/v1/txt2img", base)
        guided = _post("/sdapi/v1/txt2img", dict(base, alwayson_scripts={"DPS Guidance": {"args": [settings]}}))
    except urllib.error.URLError as exc:
        pytest.skip(f"WebUI at {WEBUI_URL} not reachable: {exc}")
    info = json.loads(guided["info"])
    text = info["infotexts"][0]
    assert "DPS: " in text and "DPS error" not in text, text

    def residual(b64: str) -> float:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype="float32") / 127.5 - 1
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        y = torch.from_numpy(low.astype("float32") / 127.5 - 1).permute(2, 0, 1)[None]
        return float((SuperResolution(factor=factor)(x) - y).norm())

    assert residual(guided["images"][0]) < residual(plain["images"][0])


def _real_cfg_denoiser_module(root: Path, fake: dict):
    """The host's own ``modules/sd_samplers_cfg_denoiser.py``, loaded by file over fake ``modules``
    packages: prompt parsing, callbacks and the refiner are stubbed, the forward itself is the host's."""
    import importlib.util
    import types

    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.reconstruct_multicond_batch = lambda c, step: ([[(i, 1.0)] for i in range(c.shape[0])], c)
    prompt_parser.reconstruct_cond_batch = lambda c, step: c
    common = types.ModuleType("modules.sd_samplers_common")
    common.InterruptedException = type("InterruptedException", (BaseException,), {})
    common.apply_refiner = lambda denoiser, sigma=None: False
    common.store_latent = lambda latent: setattr(fake["modules.shared"].state, "current_latent", latent)
    callbacks = fake["modules.script_callbacks"]
    class CFGDenoiserParams:  # modules/script_callbacks.py: the fields forward reads back
        def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                     denoiser=None):
            self.x, self.image_cond, self.sigma = x, image_cond, sigma
            self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser

    callbacks.CFGDenoiserParams = CFGDenoiserParams
    for name in ("CFGDenoisedParams", "AfterCFGCallbackParams"):
        setattr(callbacks, name, type(name, (), {"__init__": lambda self, x, *a, **k: setattr(self, "x", x)}))
    for name in ("cfg_denoiser_callback", "cfg_denoised_callback", "cfg_after_cfg_callback"):
        setattr(callbacks, name, lambda params: None)
    shared = fake["modules.shared"]
    shared.state.skipped, shared.state.sampling_step, shared.state.sampling_steps = False, 0, 12
    for key, value in dict(live_preview_content="Prompt", skip_early_cond=0.0, s_min_uncond_all=False,
                           pad_cond_uncond=False, pad_cond_uncond_v0=False, batch_cond_uncond=True).items():
        setattr(shared.opts, key, value)
    shared.opts.__dict__.setdefault("live_preview_content", "Prompt")
    shared.state.__dict__.setdefault("interrupted", False)
    fake["modules"].prompt_parser, fake["modules"].sd_samplers_common = prompt_parser, common
    extra = {"modules.prompt_parser": prompt_parser, "modules.sd_samplers_common": common}
    spec = importlib.util.spec_from_file_location("modules.sd_samplers_cfg_denoiser",
                                                  root / "modules" / "sd_samplers_cfg_denoiser.py")
    module = importlib.util.module_from_spec(spec)
    return module, spec, extra


@pytest.mark.parametrize("rule,zeta", [("dps", 10.0), ("polyak", 1.0)], ids=["dps", "polyak-default"])
def test_the_hosts_own_cfg_denoiser_forward_is_guided(monkeypatch, rule, zeta):
    """The A1111 CFGDenoiser.forward from WEBUI_PATH (cond/uncond batching, CFG, preview side outputs), driven
    by a no_grad Euler loop with the DPS wrapper installed by the script: the residual must fall."""
    root = _root()
    if _is_forge(root):
        pytest.skip("Forge's CFGDenoiser delegates to its backend; its post-CFG path is covered by the fakes")
    import sys

    from conftest import ROOT
    from dps_webui.settings import ARG_NAMES, DPSSettings
    from fakes import webui_host as host

    fake = host.make_modules()
    module, spec, extra = _real_cfg_denoiser_module(root, fake)
    for name, value in {**fake, **extra}.items():
        monkeypatch.setitem(sys.modules, name, value)
    spec.loader.exec_module(module)
    script_module, [script_class] = host.load_script(ROOT / "scripts" / "dps_guidance.py", ROOT)
    shared = fake["modules.shared"]
    sd_model = host.SdModel()
    sd_model.cond_stage_key = "txt"
    shared.sd_model = sd_model

    class RealDenoiser(module.CFGDenoiser):  # the host's CFGDenoiserKDiffusion, minus k_diffusion's import
        @property
        def inner_model(self):
            return self.model_wrap

    class Sampler(host.KDiffusionSampler):
        def __init__(self, p):
            super().__init__(sd_model, shared)
            self.model_wrap_cfg = RealDenoiser(self)
            self.model_wrap_cfg.model_wrap = self.model_wrap
            self.model_wrap_cfg.p, self.model_wrap_cfg.total_steps = p, p.steps

        def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
            image_conditioning = torch.zeros(x.shape[0], 5, 1, 1)
            # the host's conds are (batch, tokens, width) tensors
            return super().sample(p, x, conditioning.view(-1, 1, 1), unconditional_conditioning.view(-1, 1, 1), steps,
                                  image_conditioning)

    with torch.no_grad():
        truth = sd_model.decode_first_stage(torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5)
    from dps.operators import SuperResolution
    y = SuperResolution(factor=4)(truth)
    upload = ((y[0].permute(1, 2, 0) + 1) / 2).numpy()
    settings = dict(enabled=True, task="super_resolution", sr_factor=4, source="upload", image=upload, zeta=zeta,
                    rule=rule, noise_sigma=0.01)
    args = [settings.get(n, getattr(DPSSettings(), n)) for n in ARG_NAMES]
    plain, _ = host.process_images(host.Processing(sd_model), [], [], Sampler)
    p = host.Processing(sd_model)
    guided, info = host.process_images(p, [script_class()], args, Sampler)
    residual = lambda image: float((SuperResolution(factor=4)(image) - y).norm())  # noqa: E731
    assert "DPS error" not in info and "DPS note" not in info, info
    print(f"host forward: residual guided {residual(guided):.4f} vs unguided {residual(plain):.4f}")
    assert residual(guided) < 0.5 * residual(plain), (residual(guided), residual(plain))
    assert not any(p.sampler.preview_had_grad)
