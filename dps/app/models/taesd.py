"""TAESD, the tiny autoencoder of Stable Diffusion's latent spaces (Ollin Boer Bohan, MIT licence).

The architecture is rebuilt here from its description (conv(3,64), residual blocks, stride-2 convs,
conv(64,C); the decoder mirrors it after a tanh(x/3)·3 clamp) so that the real weights, which users keep
in ComfyUI's ``models/vae_approx/``, load by their ``nn.Sequential`` keys. Encoder input and decoder
output are RGB in [0, 1]; latents are in the diffusion model's own latent space.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..weights import load_checked


class Block(nn.Module):
    """conv-ReLU-conv-ReLU-conv plus the input, then ReLU."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1),
                                  nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.skip = nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Clamp(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


def _conv(c_in: int, c_out: int, **kw) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kw)


class TinyEncoder(nn.Sequential):
    def __init__(self, latent_channels: int = 4) -> None:
        layers: list[nn.Module] = [_conv(3, 64), Block(64)]
        for _ in range(3):
            layers += [_conv(64, 64, stride=2, bias=False), Block(64), Block(64), Block(64)]
        layers.append(_conv(64, latent_channels))
        super().__init__(*layers)


class TinyDecoder(nn.Sequential):
    def __init__(self, latent_channels: int = 4) -> None:
        layers: list[nn.Module] = [Clamp(), _conv(latent_channels, 64), nn.ReLU()]
        for _ in range(3):
            layers += [Block(64), Block(64), Block(64), nn.Upsample(scale_factor=2), _conv(64, 64, bias=False)]
        layers += [Block(64), _conv(64, 3)]
        super().__init__(*layers)


def load_taesd(path: str | Path, kind: str) -> nn.Module:
    """Load a TAESD ``kind`` ("encoder" or "decoder") from a safetensors file, checking keys and shapes.

    The number of latent channels (4 for SD1.x/SDXL, 16 for SD3/FLUX) is read from the file.
    """
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"TAESD file not found: {path}; pass the path of e.g. taesd_decoder.safetensors "
                         "(ComfyUI keeps them in models/vae_approx/)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            probe = "1.weight" if kind == "decoder" else "14.weight"
            channels = f.get_slice(probe).get_shape()[1 if kind == "decoder" else 0] if probe in keys else None
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from exc
    if channels is None:
        raise ValueError(f"{path} is not a TAESD {kind} (key {probe!r} missing); did you pass the "
                         f"{'encoder' if kind == 'decoder' else 'decoder'} file?")
    model = TinyDecoder(channels) if kind == "decoder" else TinyEncoder(channels)
    model.load_state_dict(load_checked(path, model.state_dict(), what=f"TAESD {kind}"))
    return model.float().eval().requires_grad_(False)
