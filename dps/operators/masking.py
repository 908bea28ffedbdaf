"""Inpainting: keep the measured pixels, drop the missing ones.

Masks follow ComfyUI's MASK convention: **1 = missing** (to be filled), 0 = measured. ``A x = (1 - m) ⊙ x``
is diagonal, so it is its own adjoint and its pseudo-inverse divides by the kept weight where it is
non-zero. Mask generators reproduce the paper's protocols (Chung et al. 2023, official
``inpainting_config``): a box of half the image side with a margin of 1/16 (128 px at 256, margin 16),
and a random fraction of pixels, the same pixels on every channel.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..validate import check_tensor
from .base import LinearOperator, autograd_safe, check_image
from .spec import OperatorSpec, Param, Task


def box_mask(height: int, width: int, box: tuple[int, int] | None = None, margin: tuple[int, int] | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1, 1, H, W) mask with one missing box placed uniformly at random inside the margin."""
    bh, bw = box if box is not None else (height // 2, width // 2)
    mh, mw = margin if margin is not None else (height // 16, width // 16)
    if bh + 2 * mh > height or bw + 2 * mw > width or min(bh, bw) < 1:
        raise ValueError(f"a {bh}x{bw} box with margin {mh}x{mw} does not fit a {height}x{width} image; "
                         "make the box or the margin smaller")
    top = mh + int(torch.randint(0, height - 2 * mh - bh + 1, (), generator=generator))
    left = mw + int(torch.randint(0, width - 2 * mw - bw + 1, (), generator=generator))
    mask = torch.zeros(1, 1, height, width)
    mask[..., top:top + bh, left:left + bw] = 1.0
    return mask


def random_mask(height: int, width: int, fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1, 1, H, W) mask with exactly ``floor(fraction * H * W)`` missing pixels."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction of missing pixels must lie in [0, 1], got {fraction!r}")
    missing = int(fraction * height * width)
    order = torch.randperm(height * width, generator=generator)
    mask = torch.zeros(height * width)
    mask[order[:missing]] = 1.0
    return mask.reshape(1, 1, height, width)


class Inpainting(LinearOperator):
    """``y = (1 - mask) ⊙ x``; ``mask`` is 1 where pixels are missing.

    Args:
        mask: (H, W), (C, H, W) or (B, C, H, W) with values in [0, 1]; C may be 1 (all channels)
            and B may be 1 (all samples).
    """

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        check_tensor("mask", mask)
        if mask.ndim not in (2, 3, 4):
            raise ValueError("mask must be a tensor of shape (H, W), (C, H, W) or (B, C, H, W) with 1 = missing")
        mask = mask.float()
        while mask.ndim < 4:
            mask = mask[None]
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError("mask values must lie in [0, 1] (1 = missing, 0 = measured); normalise the mask first")
        if bool((mask >= 1).flatten(1).all(1).any()):
            warnings.warn("the inpainting mask marks every pixel missing (all ones) for at least one sample: nothing "
                          "is measured there and guidance has no effect; 1 = missing, 0 = measured (invert the mask?)",
                          UserWarning, stacklevel=2)
        self.register_buffer("mask", mask)

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        fits = (m.shape[-2:] == x.shape[-2:] and m.shape[0] in (1, x.shape[0]) and m.shape[1] in (1, x.shape[1]))
        if not fits:
            raise ValueError(f"mask of shape {tuple(m.shape)} does not fit images of shape {tuple(x.shape)}; "
                             f"resize the mask to {x.shape[-2]}x{x.shape[-1]} (batch 1 or {x.shape[0]}, "
                             f"channels 1 or {x.shape[1]})")
        return 1.0 - autograd_safe(m).to(device=x.device, dtype=x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        return self._keep(x) * x

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        check_image(y, "y")
        return self._keep(y) * y

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 0, tol: float = 0.0) -> torch.Tensor:
        """Exact: ``y / (1 - mask)`` where measured, 0 where missing."""
        check_image(y, "y")
        keep = self._keep(y)
        return torch.where(keep > 1e-6, y / keep.clamp_min(1e-6), torch.zeros_like(y))


def _masks(make) -> Callable[[tuple[int, ...], int], dict]:
    """A task's ``draw``: one mask per image of the batch from ``make(h, w, generator)``, seeded."""
    def draw(shape: tuple[int, ...], seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {"mask": torch.cat([make(shape[-2], shape[-1], g) for _ in range(shape[0])])}
    return draw


SPECS = (OperatorSpec(
    name="inpainting", display_name="Inpainting", order=20,
    description="Fill in the missing (masked) pixels of a picture with holes, scratches or removed objects.",
    measurement="the picture with holes (the pixels under the mask are unknown)",
    params=(Param("mask", "mask", label="Inpainting mask",
                  help="1 (white) = missing, 0 (black) = measured; the same size in pixels as the measurement."),),
    factory=Inpainting,
    aliases=("inpaint", "fill", "hole", "remove object", "scratch", "restore", "mask"),
    from_picture="apply",
    # The paper's protocols: a box of half the side inside a margin of 1/16; 70 % of the pixels missing.
    tasks=(Task("box_inpainting", draw=_masks(lambda h, w, g: box_mask(h, w, generator=g))),
           Task("random_inpainting", draw=_masks(lambda h, w, g: random_mask(h, w, 0.7, generator=g)))),
),)
