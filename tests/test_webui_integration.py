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
