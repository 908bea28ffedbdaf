"""Super-resolution: antialiased downsampling by an integer factor, written as separable matrices.

``A x = M_h x M_wᵀ`` per channel, so the adjoint ``Aᵀy = M_hᵀ y M_w`` and the pseudo-inverse
``A⁺y = M_h⁺ y (M_w⁺)ᵀ`` (the pseudo-inverse of a Kronecker product is the Kronecker product of the
pseudo-inverses) are exact. The bicubic filter is the paper's x4 operator (Chung et al. 2023, §4,
official code: Shocher's resizer, cubic kernel of width 4 widened by the factor for antialiasing,
mirror boundary); "bilinear" uses the triangle kernel the same way and "area" averages factor x factor
blocks.
"""

from __future__ import annotations

import math

import torch

from ..validate import check_choice, check_int
from .base import LinearOperator, check_image
from .spec import OperatorSpec, Param

FILTERS = ("bicubic", "bilinear", "area")


def _cubic(t: torch.Tensor) -> torch.Tensor:
    """Keys' cubic convolution kernel with a = -0.5 (Keys 1981), support [-2, 2]."""
    a = t.abs()
    inner = 1.5 * a**3 - 2.5 * a**2 + 1.0
    outer = -0.5 * a**3 + 2.5 * a**2 - 4.0 * a + 2.0
    return torch.where(a <= 1, inner, torch.where(a < 2, outer, torch.zeros_like(a)))


def _triangle(t: torch.Tensor) -> torch.Tensor:
    return (1.0 - t.abs()).clamp_min(0.0)


def downsampling_matrix(n: int, factor: int, filter: str) -> torch.Tensor:
    """The (n // factor, n) float64 matrix that filters and decimates one axis."""
    n_out = n // factor
    if filter == "area":
        m = torch.zeros(n_out, n, dtype=torch.float64)
        for j in range(n_out):
            m[j, j * factor:(j + 1) * factor] = 1.0 / factor
        return m
    kernel, radius = (_cubic, 2.0) if filter == "bicubic" else (_triangle, 1.0)
    half = math.ceil(radius * factor)
    m = torch.zeros(n_out, n, dtype=torch.float64)
    for j in range(n_out):
        centre = (j + 0.5) * factor - 0.5
        taps = torch.arange(math.floor(centre) - half, math.floor(centre) + half + 2, dtype=torch.float64)
        weights = kernel((taps - centre) / factor)
        weights = weights / weights.sum()
        for tap, w in zip(taps.long().tolist(), weights.tolist()):
            # Mirror boundary: -1 -> 0, n -> n - 1 (symmetric reflection, as the official resizer).
            while tap < 0 or tap >= n:
                tap = -tap - 1 if tap < 0 else 2 * n - 1 - tap
            m[j, tap] += w
    return m


class SuperResolution(LinearOperator):
    """``y = downsample_factor(x)`` with an antialiasing filter.

    Args:
        factor: integer downsampling factor (the paper uses 4); image sides must be divisible by it.
        filter: "bicubic" (default, the paper's), "bilinear" or "area".
    """

    def __init__(self, factor: int = 4, filter: str = "bicubic") -> None:
        super().__init__()
        self.factor = check_int("factor", factor, minimum=1, fix="a positive integer such as 2, 4 or 8")
        check_choice("filter", filter, FILTERS)
        self.filter = filter
        self._cache: dict[tuple, torch.Tensor] = {}

    def extra_repr(self) -> str:
        return f"factor={self.factor}, filter={self.filter!r}"

    def _matrix(self, n: int, like: torch.Tensor, pinv: bool = False) -> torch.Tensor:
        key = (n, pinv, like.device, like.dtype)
        if key not in self._cache:
            with torch.inference_mode(False):
                m = downsampling_matrix(n, self.factor, self.filter)
                if pinv:
                    m = torch.linalg.pinv(m)
                self._cache[key] = m.to(device=like.device, dtype=like.dtype)
        return self._cache[key]

    def _check_size(self, h: int, w: int) -> None:
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"image size {h}x{w} is not divisible by the super-resolution factor {self.factor}; crop or "
                f"resize the image to a multiple of {self.factor} (e.g. {h - h % self.factor}x{w - w % self.factor})")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        h, w = x.shape[-2:]
        self._check_size(h, w)
        return self._matrix(h, x) @ x @ self._matrix(w, x).mT

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        check_image(y, "y")
        h, w = y.shape[-2] * self.factor, y.shape[-1] * self.factor
        return self._matrix(h, y).mT @ y @ self._matrix(w, y)

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 0, tol: float = 0.0) -> torch.Tensor:
        """Exact ``A⁺y`` (closed form; ``iterations`` and ``tol`` are unused)."""
        check_image(y, "y")
        h, w = y.shape[-2] * self.factor, y.shape[-1] * self.factor
        return self._matrix(h, y, pinv=True) @ y @ self._matrix(w, y, pinv=True).mT


SPECS = (OperatorSpec(
    name="super_resolution", display_name="Super-Resolution", order=10,
    description="Restore detail from a small picture: the output is factor times larger on each side.",
    measurement="the picture shrunk by an integer factor, 1/factor of the output's width and height",
    params=(
        Param("factor", "int", default=4, min=1, max=16, label="Super-resolution factor",
              help="How many times smaller the measurement is than the output, on each side (a 128 px photo "
                   "restored to 512 px: 4; the paper: 4). Image sides must be multiples of it."),
        Param("filter", "choice", default="bicubic", choices=FILTERS, label="Downsampling filter",
              help="How the measurement was shrunk: bicubic (most photos; the paper's), bilinear, or area (the "
                   "average of each factor x factor block of pixels)."),
    ),
    factory=SuperResolution,
    aliases=("upscale", "upscaler", "super resolution", "enlarge", "restore", "low resolution", "sr"),
    measurement_size=lambda h, w, factor, **_: (h // factor, w // factor),
    image_size=lambda h, w, factor, **_: (h * factor, w * factor),
),)
