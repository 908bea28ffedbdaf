"""Every model family's real architecture in the real host (issue 10, item 2).

SD1.5 (the full 860 M-parameter UNet), SDXL, SD3 and FLUX are built through ComfyUI's own model classes with
random seeded weights (``tests/comfy_families.py``: real widths, depth reduced for SDXL, SD3 and FLUX so each
process stays near 5 GB), each with a random KL VAE of its checkpoint's architecture built by
``comfy.sd.VAE(sd=...)``. For each family a subprocess in ComfyUI's Python (``tests/comfy_real_scale_driver.py``)
runs KSampler (euler, 64 px, zero conditioning of the family's shapes) unguided and guided through
``nodes.hook.apply_dps`` with ComfyUI's wrapper types, under ``torch.inference_mode()`` as the executor runs.

Checked: a finite output; the measurement residual falls during the guided run and ends below the unguided
run's; the α of ``x = α x0 + σε`` each guided step used is the host's (``noise_scaling``: 1 − σ for SD3 and
FLUX, 1 for SD1.5 and SDXL); the image guidance decodes from a latent equals the host's VAE Decode of it (the
latent format undone by ``process_latent_out``, then the VAE's own module); the latent formats' constants; and,
when ``nodes.hook.Settings`` has ``vae_gradient``, every mode: one guided step gives the same result as "full"
and the same J_Dᵀv through the family's VAE. Random weights are no prior: this checks the host plumbing at real
sizes, not picture quality.

Needs ``COMFYUI_PATH`` (and ``COMFYUI_PYTHON``, a stub torchvision on ``PYTHONPATH`` for CPU torch: see the
docs/development.md). About 2 CPU-minutes per family.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

COMFY = os.environ.get("COMFYUI_PATH")
PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
DRIVER = Path(__file__).with_name("comfy_real_scale_driver.py")
FAMILIES = ("sd15", "sdxl", "sd3", "flux")
EXPECTED = {   # model class, supported-model class, model sampling bases, latent scale and shift, channels, VAE class
    "sd15": ("BaseModel", "SD15", ["ModelSamplingDiscrete", "EPS"], 0.18215, 0.0, 4, "AutoencoderKL"),
    "sdxl": ("SDXL", "SDXL", ["ModelSamplingDiscrete", "EPS"], 0.13025, 0.0, 4, "AutoencoderKL"),
    "sd3": ("SD3", "SD3", ["ModelSamplingDiscreteFlow", "CONST"], 1.5305, 0.0609, 16, "AutoencodingEngine"),
    "flux": ("Flux", "Flux", ["ModelSamplingFlux", "CONST"], 0.3611, 0.1159, 16, "AutoencodingEngine"),
}
PACK = "dps_guidance_pack_real_scale"

pytestmark = pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout with its requirements "
                                                   "installed (and COMFYUI_PYTHON to its Python) to run the "
                                                   "real-architecture tests")


def vae_gradient_modes() -> list:
    """The ``vae_gradient`` values ``nodes.hook.Settings`` accepts now, its default first; ``[None]`` when the
    setting does not exist."""
    if PACK not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACK] = module
        spec.loader.exec_module(module)
    hook = importlib.import_module(f"{PACK}.nodes.hook")
    fields = {f.name: f for f in dataclasses.fields(hook.Settings)}
    if "vae_gradient" not in fields:
        return [None]
    values = importlib.import_module(f"{PACK}.dps.vae_gradient").VAE_GRADIENTS
    default = fields["vae_gradient"].default
    return [default] + [v for v in values if v != default]


MODES = vae_gradient_modes()


def run_driver(*args: str, timeout: int = 3600) -> dict:
    env = dict(os.environ, COMFYUI_PATH=COMFY or "")
    out = subprocess.run([PYTHON, str(DRIVER), *args], capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-5000:]
    return json.loads(out.stdout.rsplit("RESULT ", 1)[1])


@pytest.fixture(scope="module")
def family_result():
    cache: dict = {}

    def get(family: str) -> dict:
        if family not in cache:                     # one driver run per family, its failure kept as well
            try:
                cache[family] = run_driver("family", family, str(ROOT), json.dumps(MODES))
            except (AssertionError, subprocess.TimeoutExpired) as err:
                cache[family] = err
        if isinstance(cache[family], Exception):
            raise cache[family]
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_guided_ksampler_real_architecture(family, family_result):
    r = family_result(family)
    model_class, config_class, sampling, scale, shift, channels, vae_class = EXPECTED[family]
    assert (r["info"]["model_class"], r["info"]["config_class"]) == (model_class, config_class)
    assert r["info"]["model_sampling"] == sampling
    assert r["vae"] == {"class": vae_class, "latent_channels": channels}
    fmt = r["latent_format"]
    assert (fmt["scale"], fmt["shift"]) == pytest.approx((scale, shift))
    assert fmt["process_in"] < 1e-6 and fmt["process_out"] < 1e-5       # (z - shift)·scale and its inverse

    main, plain = r["main"], r["plain"]
    assert plain["finite"] and main["finite"]
    if MODES != [None]:                                                  # the default mode resolved to a plan
        assert main["plans"] and all(p["mode"] in MODES[1:] for p in main["plans"]), main["plans"]
    d = [v[0] for v in main["distances"]]
    assert len(d) == 2 and d[-1] < 0.9 * d[0], d                        # the residual falls during the run
    assert main["residual"][0] < 0.9 * plain["residual"][0], (plain["residual"], main["residual"])

    # α of x = α x0 + σε: what each guided step used against the host's noise_scaling at that σ
    inner = [(s, a, host) for s, a, host in main["alphas"] if host > 0]
    assert inner, main["alphas"]
    for sigma, alpha, host in inner:
        assert alpha == pytest.approx(host, abs=1e-6), (sigma, alpha, host)
        assert host == pytest.approx(1 - sigma if sampling[1] == "CONST" else 1.0, abs=1e-6)
    if sampling[1] == "CONST":
        assert any(host < 1 for _, _, host in inner)                      # a step with 0 < α < 1 was guided

    # The image guidance decodes from a latent is the host's VAE Decode of it (the host clamps to [0, 1]).
    assert main["decode_max_diff"] <= 1e-4, main["decode_max_diff"]
    assert main["decode_saturated"] < 0.5                                 # most pixels are compared unclamped


@pytest.mark.parametrize("family", FAMILIES)
def test_recomputed_denoiser_gradient_real_architecture(family, family_result):
    """Gradient "full" through the family's real denoiser with every block recomputed in the backward pass
    (``dps.recompute``, what "auto" does when the plain backward does not fit) equals the plain backward pass."""
    r = family_result(family)
    assert "denoiser" in r, "nodes.hook.Settings has no denoiser_gradient"
    d = r["denoiser"]
    chosen, total = d["checkpointed"]["recomputed"]
    assert total > 4 and chosen == total, d                    # the family's blocks were found and all recomputed
    assert d["full"]["recomputed"][0] == 0, d
    assert d["grad_norm"] > 0 and d["rel_diff"] < 1e-5, d


@pytest.mark.parametrize("mode", MODES[1:] if MODES != [None] else [])
@pytest.mark.parametrize("family", FAMILIES)
def test_vae_gradient_mode_real_architecture(family, mode, family_result):
    r = family_result(family)
    one = r["one_step"][mode]
    assert one["finite"] and len(one["distances"]) == 1
    assert [p["mode"] for p in one["plans"]] == [mode]
    # At 64 px checkpointing is exact and each tile's overlap spans the whole latent, so tiles are exact too.
    assert one["rel_diff_vs_full"] < 1e-4, one["rel_diff_vs_full"]
    assert r["vjp"][mode] < 1e-4, r["vjp"]
