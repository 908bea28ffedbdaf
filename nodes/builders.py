"""Host-free constructors behind the DPS nodes: ComfyUI values in, ``dps`` objects out.

ComfyUI IMAGE is (B, H, W, C) in [0, 1] and MASK is (B, H, W) with 1 = missing, ours too. The operator nodes
are generated from the operator registry (``nodes.v3``); ``build_operator`` turns their inputs into the core's.
"""

from __future__ import annotations

from typing import Any

import torch

from ..dps import noise as dps_noise
from ..dps import operators as ops
from ..dps.operators import registry
from ..dps.operators.spec import OperatorSpec, Param
from ..dps.host import image_to_nchw, nchw_to_image


def core_value(param: Param, value: Any) -> Any:
    """A node input as the core's value: a MASK (B, H, W) becomes a mask with 1 = missing ((H, W) for one,
    (B, 1, H, W) for a batch that guides a batch of images); an IMAGE an NCHW batch in [-1, 1]."""
    if value is None:
        return None
    if param.kind == "mask":
        if not isinstance(value, torch.Tensor) or value.ndim not in (2, 3):
            raise ValueError(f"{param.name} must be a MASK (batch, height, width) with 1 = missing; use Load Image's "
                             "mask, DPS Box Mask or DPS Random Mask")
        mask = value.float()
        if mask.ndim == 3:
            mask = mask[0] if mask.shape[0] == 1 else mask[:, None]
        return mask.clamp(0, 1)
    if param.kind == "image":
        return image_to_nchw(value)
    return value


def build_operator(spec: OperatorSpec, values: dict[str, Any]) -> ops.Operator:
    """The operator of a generated operator node from its input values (optional inputs may be missing)."""
    return spec.build(**{name: core_value(spec.param(name), v) for name, v in values.items() if v is not None})


def inpainting(mask: torch.Tensor) -> ops.Operator:
    """An inpainting operator from a MASK (1 = missing); a batch of masks guides a batch of images."""
    return build_operator(registry.get("inpainting"), {"mask": mask})


def box_mask(width: int, height: int, box_width: int, box_height: int, margin: int, seed: int) -> torch.Tensor:
    """A MASK (1, H, W) with one missing box placed at random (seeded) inside the margin."""
    g = torch.Generator().manual_seed(int(seed))
    return ops.box_mask(height, width, box=(box_height, box_width), margin=(margin, margin), generator=g)[:, 0]


def random_mask(width: int, height: int, fraction: float, seed: int) -> torch.Tensor:
    """A MASK (1, H, W) with ``fraction`` of the pixels missing, chosen at random (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    return ops.random_mask(height, width, fraction, generator=g)[:, 0]


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


def preview(measurement: torch.Tensor) -> torch.Tensor:
    """The measurement IMAGE as shown in DPS Measure's preview: clamped to [0, 1] when it is a picture (noise may
    overshoot a little), stretched to its own range per image when it is not one (phase retrieval's Fourier
    magnitudes lie far outside [0, 1])."""
    lo, hi = float(measurement.min()), float(measurement.max())
    if lo >= -0.5 and hi <= 1.5:
        return measurement.clamp(0.0, 1.0)
    flat = measurement.flatten(1)
    low = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = (flat.amax(dim=1).view(-1, 1, 1, 1) - low).clamp_min(1e-12)
    return (measurement - low) / span
