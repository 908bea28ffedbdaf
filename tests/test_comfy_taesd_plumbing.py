"""Latent plumbing with real weights (issue 10, item 3).

The real TAESD, TAESDXL, TAESD3 and TAEF1 from ../shared/assets/taesd are loaded as the host's VAE by ComfyUI's
own ``VAELoader`` (encoder + decoder pair from ``models/vae_approx``, with the family's ``vae_scale`` and
``vae_shift``) and, for the node's ``fast_decoder``, as a lone decoder by the node's own loader. With a small
model of each family built through ComfyUI's classes (``comfy_families``, scale "tiny": the family's latent
format and model sampling), a subprocess in ComfyUI's Python (``tests/comfy_real_scale_driver.py taesd``) runs a
guided KSampler through ``nodes.hook.apply_dps`` and then decodes latents through the decoder guidance used.

Checked, with and without the fast decoder: the image guidance decodes from a latent equals the host's VAE
Decode of the same latent (max difference <= 1e-4) for the sampled latent and for a real photo (scikit-image's
astronaut, 256 px) encoded by the host's VAE Encode; the photo survives the round trip (so the weights and the
latent scale and shift are the real ones); guidance measures the photo's own latent close to its measurement;
the residual falls during the guided run; and every ``vae_gradient`` mode of ``nodes.hook.Settings`` runs.

Needs ``COMFYUI_PATH`` (see tests/test_comfy_integration.py), scikit-image in ComfyUI's Python and the TAESD
weights in ../shared.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import ROOT, TAESD
from test_comfy_real_scale import COMFY, MODES, PYTHON, run_driver

FAMILIES = {"sd15": ("taesd", 4), "sdxl": ("taesdxl", 4), "sd3": ("taesd3", 16), "flux": ("taef1", 16)}
FILES = [f"{name}_{part}.safetensors" for name, _ in FAMILIES.values() for part in ("encoder", "decoder")]

pytestmark = [
    pytest.mark.skipif(not COMFY, reason="set COMFYUI_PATH to a ComfyUI checkout with its requirements installed "
                                         "(and COMFYUI_PYTHON to its Python) to run the real-host tests"),
    pytest.mark.skipif(not all((TAESD / f).exists() for f in FILES),
                       reason=f"TAESD weights (taesd, taesdxl, taesd3, taef1) not found at {TAESD} "
                              "(../shared beside the checkout)"),
]


@pytest.fixture(scope="module")
def result() -> dict:
    probe = subprocess.run([PYTHON, "-c", "import skimage"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip("scikit-image is not installed in ComfyUI's Python (pip install scikit-image there): the "
                    "real photo comes from its sample images")
    return run_driver("taesd", str(ROOT), str(TAESD), json.dumps(MODES))


def test_vae_loader_lists_every_taesd(result):
    assert {"taesd", "taesdxl", "taesd3", "taef1"} <= set(result["vae_list"])


@pytest.mark.parametrize("family", FAMILIES)
def test_latent_scale_and_shift_match_the_model(family, result):
    r = result["families"][family]
    name, channels = FAMILIES[family]
    assert r["taesd"] == name and r["vae_latent_channels"] == channels
    assert r["vae_scale_shift"] == pytest.approx(r["model_scale_shift"], abs=1e-6)
    assert r["photo_roundtrip_psnr"] > 18.0, r["photo_roundtrip_psnr"]     # random weights give single digits


@pytest.mark.parametrize("decoder", ["vae", "fast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_guidance_decodes_as_the_host(family, decoder, result):
    r = result["families"][family]
    case = r[f"{decoder}/{MODES[0]}"]
    assert case["finite"]
    d = [v[0] for v in case["distances"]]
    assert len(d) == 2 and d[1] < d[0], d
    for label in ("sampled", "photo", "small"):                 # small: the photo at the measurement's scale
        assert case[label]["max_diff"] <= 1e-4, (label, case[label])
    for label in ("photo", "small"):                            # the host clamps; most photo pixels it does not
        assert case[label]["saturated"] < 0.25, (label, case[label])
    # Guidance measures the photo's own latent close to the photo's measurement, a zero latent far from it.
    assert case["small"]["distance"] < 0.5 * case["zero_latent_distance"], case
    other = r[f"{'fast' if decoder == 'vae' else 'vae'}/{MODES[0]}"]
    assert case["small"]["distance"] == pytest.approx(other["small"]["distance"], rel=1e-4)


@pytest.mark.parametrize("mode", MODES[1:] if MODES != [None] else [])
@pytest.mark.parametrize("decoder", ["vae", "fast"])
@pytest.mark.parametrize("family", FAMILIES)
def test_every_vae_gradient_mode_guides(family, decoder, mode, result):
    case = result["families"][family][f"{decoder}/{mode}"]
    assert case["finite"] and len(case["distances"]) == 1
    assert case["plans"] == [mode]
    first = result["families"][family][f"{decoder}/{MODES[0]}"]["distances"][0]
    assert case["distances"][0] == pytest.approx(first, rel=1e-4)     # the residual itself never depends on it
