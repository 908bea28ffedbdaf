"""Every model family's real architecture with random weights, built through ComfyUI's own classes.

No checkpoint can be downloaded in CI, but ComfyUI's model classes can be instantiated from the ``unet_config``
its model detection derives from a checkpoint (``comfy.model_detection.detect_unet_config``), exactly as
``comfy.sd.load_diffusion_model_state_dict`` does: ``supported_models.<Family>(unet_config)``, then
``set_inference_dtype``, ``get_model`` and a ``comfy.model_patcher.ModelPatcher``. The VAE is built the way a
checkpoint's VAE is: a state dict of the KL autoencoder (keys as in the checkpoint) handed to
``comfy.sd.VAE(sd=...)``, which detects the architecture from the keys. Random weights are no image prior:
these models tell memory, time and whether the host's code path runs (latent formats, model sampling,
conditioning), not quality.

Import this module in a process where ComfyUI's root is on ``sys.path`` (``setup_comfy`` does that); it
imports ``comfy`` only inside its functions. Used by ``tests/test_comfy_real_scale.py``,
``tests/test_comfy_taesd_plumbing.py`` and bench scripts.

Scales (``scale=``):

* ``"real"``: real widths; depth reduced only where float32 weights would not fit a few GB of RAM:
  SD1.5 the full UNet (860 M parameters); SDXL with transformer depth 2 instead of 10 at the 1280-channel level
  (and in the middle block); SD3 (medium: hidden 1536, 24 heads) with 4 of its 24 joint blocks; FLUX.1-dev
  (hidden 3072, 24 heads) with 2 of 19 double and 2 of 38 single blocks.
* ``"tiny"``: the same ComfyUI classes (``model_base.BaseModel``/``SDXL``/``SD3``/``Flux``, their latent formats
  and model sampling) with small widths, for plumbing tests that need the family but not its size.

Conditioning is zeros of the shapes the family's text encoders produce (CLIP-L 768, CLIP-L+G 2048 with a
pooled 1280 vector, T5-XXL 4096 with pooled 2048 (SD3) or 768 (FLUX)); the sequence length is shortened
(``tokens``) to keep CPU time down.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

FAMILIES = ("sd15", "sdxl", "sd3", "flux")
SCALES = ("real", "tiny")

# unet_config as comfy.model_detection.detect_unet_config returns it for each family's checkpoint ("real"),
# before unet_extra_config and the dtype are added by the supported-model class.
_SD15 = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
_SDXL = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 2, 2],
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth_middle": 2,
    "use_linear_in_transformer": True, "context_dim": 2048, "use_temporal_resblock": False,
    "use_temporal_attention": False,
}
# The real SDXL base: transformer_depth [0, 0, 2, 2, 10, 10], output [0, 0, 0, 2, 2, 2, 10, 10, 10], middle 10.
_SD3 = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "num_blocks": 4, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
    "num_patches": 36864, "pos_embed_max_size": 192, "pos_embed_scaling_factor": None, "x_block_self_attn_layers": [],
}
# The real SD3 medium has num_blocks = depth = 24 (MMDiT's width is 64 x depth, so depth stays 24).
_FLUX = {
    "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 2,
    "depth_single_blocks": 2, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
# The real FLUX.1-dev: depth 19, depth_single_blocks 38.

_TINY = {
    "sd15": dict(_SD15, model_channels=64, num_res_blocks=[1], channel_mult=[1], transformer_depth=[1],
                 transformer_depth_output=[1, 1], transformer_depth_middle=1),
    "sdxl": dict(_SDXL, model_channels=64, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[0, 1],
                 transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1),
    "sd3": dict(_SD3, depth=2, num_blocks=2, num_patches=64 * 64, pos_embed_max_size=64,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": 4096, "out_features": 128}}),
    "flux": dict(_FLUX, hidden_size=256, num_heads=2, depth=1, depth_single_blocks=1),
}
_REAL = {"sd15": _SD15, "sdxl": _SDXL, "sd3": _SD3, "flux": _FLUX}

# Per family: the supported-model class name, latent channels, (context tokens, width), pooled width, CFG.
_SPEC = {
    "sd15": {"cls": "SD15", "channels": 4, "context": (77, 768), "pooled": None, "cfg": 2.0},
    "sdxl": {"cls": "SDXL", "channels": 4, "context": (77, 2048), "pooled": 1280, "cfg": 2.0},
    "sd3": {"cls": "SD3", "channels": 16, "context": (77, 4096), "pooled": 2048, "cfg": 2.0},
    "flux": {"cls": "Flux", "channels": 16, "context": (77, 4096), "pooled": 768, "cfg": 1.0},   # distilled: CFG 1
}


def setup_comfy(path: str | None = None, cpu: bool = True) -> None:
    """Put ComfyUI (``path`` or ``$COMFYUI_PATH``) first on ``sys.path`` and make ``comfy`` importable without
    its command line; ``cpu`` runs it on the CPU (``--cpu``). Call before importing anything from ComfyUI."""
    path = path or os.environ["COMFYUI_PATH"]
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    comfy.cli_args.args.cpu = cpu


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.GroupNorm, nn.LayerNorm)) or "norm" in type(module).__name__.lower()


@torch.no_grad()
def fill_random(module: nn.Module, seed: int = 0) -> int:
    """Fill every parameter of ``module`` in place (ComfyUI's ops skip initialisation, so they hold garbage):
    norm scales 1, biases 0, other weights Gaussian with variance 1/fan-in (fan-in = the weight's size per
    output unit). Seeded; works on inference tensors inside ``torch.inference_mode()``. Returns the number of
    parameters."""
    gen = torch.Generator().manual_seed(seed)
    count = 0
    for mod in module.modules():
        norm = _is_norm(mod)
        for name, p in mod.named_parameters(recurse=False):
            if norm and name in ("weight", "scale"):
                p.fill_(1.0)
            elif name == "bias" or p.ndim < 2:
                p.zero_()
            else:
                p.normal_(0.0, 1.0 / math.sqrt(max(p[0].numel(), 1)), generator=gen)
            count += p.numel()
    for name, b in module.named_buffers():
        if b.is_floating_point() and not torch.isfinite(b).all():
            raise RuntimeError(f"buffer {name} is not initialised")
    return count


def unet_config(family: str, scale: str = "real") -> dict:
    """The ``unet_config`` of ``family`` at ``scale`` (a copy)."""
    _check(family, scale)
    config = (_REAL if scale == "real" else _TINY)[family]
    return {k: (v.copy() if isinstance(v, (list, dict)) else v) for k, v in config.items()}


def _check(family: str, scale: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def build_model(family: str, scale: str = "real", seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A ``ModelPatcher`` around ``supported_models.<Family>(unet_config).get_model({})`` with random seeded
    weights, as ``comfy.sd.load_diffusion_model_state_dict`` builds it (load and offload device from
    ``comfy.model_management``). Built under ``torch.inference_mode()`` like a loader run by ComfyUI's
    executor, so the weights are inference tensors, as with a real checkpoint."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models as sm
    _check(family, scale)
    config_cls = getattr(sm, _SPEC[family]["cls"])
    with torch.inference_mode():
        model_config = config_cls(unet_config(family, scale))
        model_config.set_inference_dtype(dtype, None)
        model = model_config.get_model({}, "")
        fill_random(model.diffusion_model, seed)
        model = model.to(mm.unet_offload_device())
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def vae_state_dict(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random KL-autoencoder state dict with the keys of the family's checkpoint VAE (ch 128, ch_mult 1,2,4,4,
    two res blocks): SD1.5/SDXL with 4 latent channels and the quant convs, SD3/FLUX with 16 and without."""
    from comfy.ldm.models.autoencoder import AutoencoderKL, AutoencodingEngine
    _check(family, "real")
    z = _SPEC[family]["channels"]
    dd = {"double_z": True, "z_channels": z, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    if z == 4:
        ae = AutoencoderKL(ddconfig=dd, embed_dim=4)
    else:
        ae = AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": dd},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": dd})
    fill_random(ae, seed)
    return {k: v.detach().clone() for k, v in ae.state_dict().items()}


def build_vae(family: str, seed: int = 0) -> Any:
    """``comfy.sd.VAE(sd=vae_state_dict(family, seed))`` under inference mode (as the checkpoint loader runs)."""
    import comfy.sd
    sd = vae_state_dict(family, seed)
    with torch.inference_mode():
        return comfy.sd.VAE(sd=sd)


def conditioning(family: str, batch: int = 1, tokens: int | None = None, width: int = 1024,
                 height: int = 1024) -> list:
    """Zero CONDITIONING of the shapes the family's text encoders produce (``[[cross_attn, extras]]``).
    ``tokens`` overrides the sequence length; SDXL's size conditioning gets ``width``/``height``."""
    _check(family, "real")
    spec = _SPEC[family]
    n, dim = spec["context"]
    extras: dict = {}
    if spec["pooled"] is not None:
        extras["pooled_output"] = torch.zeros(batch, spec["pooled"])
    if family == "sdxl":
        extras.update(width=width, height=height, target_width=width, target_height=height)
    if family == "flux":
        extras["guidance"] = 3.5
    return [[torch.zeros(batch, tokens or n, dim), extras]]


@dataclass
class Family:
    """A family's model and VAE with what a sampler needs: ``positive``/``negative`` conditioning and ``cfg``."""

    name: str
    scale: str
    model: Any
    vae: Any
    latent_channels: int
    positive: list
    negative: list
    cfg: float
    parameters: int
    info: dict = field(default_factory=dict)


def build(family: str, scale: str = "real", seed: int = 0, vae: bool = True, tokens: int | None = None) -> Family:
    """Model, random KL VAE (``vae=False``: none) and zero conditioning of ``family``."""
    patcher = build_model(family, scale, seed)
    params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    cond = conditioning(family, tokens=tokens)
    spec = _SPEC[family]
    return Family(name=family, scale=scale, model=patcher, vae=build_vae(family, seed + 1) if vae else None,
                  latent_channels=spec["channels"], positive=cond, negative=conditioning(family, tokens=tokens),
                  cfg=spec["cfg"], parameters=params,
                  info={"model_class": type(patcher.model).__name__,
                        "config_class": type(patcher.model.model_config).__name__,
                        "model_sampling": [c.__name__ for c in type(patcher.model.model_sampling).__bases__],
                        "latent_format": type(patcher.model.latent_format).__name__})
