"""Host-free constructors behind the DPS nodes: ComfyUI values in, ``dps`` objects out.

ComfyUI IMAGE is (B, H, W, C) in [0, 1] and MASK is (B, H, W) with 1 = missing, ours too.
"""

from __future__ import annotations

import torch

from ..dps import noise as dps_noise
from ..dps import operators as ops
from ..dps.host import image_to_nchw, nchw_to_image


def inpainting(mask: torch.Tensor) -> ops.Inpainting:
    """An inpainting operator from a MASK (1 = missing); a batch of masks guides a batch of images."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        raise ValueError("mask must be a MASK (batch, height, width) with 1 = missing; use Load Image's mask, "
                         "DPS Box Mask or DPS Random Mask")
    mask = mask.float()
    if mask.ndim == 3:
        mask = mask[0] if mask.shape[0] == 1 else mask[:, None]
    return ops.Inpainting(mask.clamp(0, 1))


def box_mask(width: int, height: int, box_width: int, box_height: int, margin: int, seed: int) -> torch.Tensor:
    """A MASK (1, H, W) with one missing box placed at random (seeded) inside the margin."""
    g = torch.Generator().manual_seed(int(seed))
    return ops.box_mask(height, width, box=(box_height, box_width), margin=(margin, margin), generator=g)[:, 0]


def random_mask(width: int, height: int, fraction: float, seed: int) -> torch.Tensor:
    """A MASK (1, H, W) with ``fraction`` of the pixels missing, chosen at random (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    return ops.random_mask(height, width, fraction, generator=g)[:, 0]


def motion_blur(kernel_size: int, intensity: float, seed: int, kernel: torch.Tensor | None = None) -> ops.MotionBlur:
    """Motion blur from a seeded random trajectory, or from a kernel IMAGE (its gray levels, normalised)."""
    if kernel is None:
        return ops.MotionBlur(kernel_size=kernel_size, intensity=intensity, seed=seed)
    k = kernel[0, ..., :3].float().mean(dim=-1) if kernel.ndim == 4 else kernel.float()
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"the kernel image is {k.shape[1]}x{k.shape[0]}; its sides must be odd (e.g. 31x31) so "
                         "the blur does not shift the picture. Crop or pad it by one pixel")
    if float(k.sum()) <= 0:
        raise ValueError("the kernel image is all black; draw the blur path in white on black")
    return ops.MotionBlur(kernel=k / k.sum())


def compose(*parts: ops.Operator | None) -> ops.Compose:
    """Apply the connected operators in order (first, then second, ...)."""
    chosen = [p for p in parts if p is not None]
    return ops.Compose(*chosen)


def gaussian_noise(sigma: float) -> dps_noise.Gaussian:
    return dps_noise.Gaussian(sigma)


def poisson_noise(rate: float) -> dps_noise.Poisson:
    return dps_noise.Poisson(rate)


def measure(image: torch.Tensor, operator: ops.Operator, noise: dps_noise.NoiseModel, seed: int) -> torch.Tensor:
    """Simulate ``y = A(x) + n`` from a clean IMAGE; returned as an IMAGE (values outside [0, 1] kept)."""
    if not isinstance(operator, ops.Operator) or not isinstance(noise, dps_noise.NoiseModel):
        raise ValueError("connect a DPS operator node and a DPS noise node")
    with torch.inference_mode(False), torch.no_grad():
        x = image_to_nchw(image.clone())
        y = operator(x)
        y = noise.sample(y, torch.Generator(device="cpu").manual_seed(int(seed)))
        return nchw_to_image(y)
