"""The embedded priors: small ε-prediction UNets shipped as safetensors with their configuration.

* ``pixel``: 28x28 grayscale digits in [-1, 1].
* ``latent``: Stable Diffusion 1.x latents (4x8x8) of 64x64 RGB digits, encoded with TAESD; images are
  obtained through a TAESD decoder that the user supplies (``--vae``), as the hosts do with SD1.5's VAE.

Both use the DDPM linear β schedule (1e-4 to 0.02, 1000 steps) of ``dps.schedule`` (the core).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .files import atomic_write
from .models.unet import SmallUNet
from .weights import load_checked, read_metadata, require_safetensors

WEIGHTS = Path(__file__).resolve().parent / "weights"
DEFAULT_FILES = {"pixel": WEIGHTS / "pixel_prior.safetensors", "latent": WEIGHTS / "latent_prior.safetensors"}


@dataclass
class Prior:
    """A trained ε-model with what sampling needs to know about it."""

    model: SmallUNet
    kind: str
    shape: tuple[int, int, int]  # (C, H, W) of the model's space
    metadata: dict[str, str]

    def eps_model(self):
        model = self.model

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t)
        return eps


def save_prior(model: SmallUNet, kind: str, shape: tuple[int, int, int], path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    metadata = {**{k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()},
                "kind": kind, "unet": json.dumps(model.config), "shape": json.dumps(list(shape))}
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_prior(path: str | Path | None = None, kind: str = "pixel") -> Prior:
    """Load an embedded prior (the bundled one for ``kind`` when ``path`` is None), checking the file."""
    if path is None:
        if kind not in DEFAULT_FILES:
            raise ValueError(f"kind must be one of {sorted(DEFAULT_FILES)}, got {kind!r}")
        path = DEFAULT_FILES[kind]
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prior weights not found: {path}; train them with `python -m dps train --kind {kind}`")
    require_safetensors(path)
    try:
        meta = read_metadata(path)
        config = json.loads(meta["unet"])
        shape = tuple(json.loads(meta["shape"]))
    except Exception as exc:
        raise ValueError(f"{path} is not a DPS prior (its safetensors metadata lacks 'unet'/'shape': {exc}); "
                         "pass a file written by `python -m dps train`") from exc
    model = SmallUNet(config["channels"], config["base"], tuple(config["mults"]))
    model.load_state_dict(load_checked(path, model.state_dict(), what="DPS prior"))
    return Prior(model.eval().requires_grad_(False), meta.get("kind", kind), shape, meta)  # type: ignore[arg-type]
