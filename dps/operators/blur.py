"""Blur operators: depthwise convolution with a fixed kernel after reflection padding.

As the official DPS code (Chung et al. 2023, configs ``gaussian_deblur``/``motion_deblur``): a 61x61
kernel, reflection padding by half the kernel, the same kernel on every channel. Unlike that code,
``adjoint`` is the true adjoint (transposed convolution, then the reflected border folded back).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..validate import check_int, check_number, check_tensor
from .base import LinearOperator, autograd_safe, check_image
from .spec import OperatorSpec, Param, Task


def gaussian_kernel(kernel_size: int, sigma: float) -> torch.Tensor:
    """Normalised isotropic Gaussian of standard deviation ``sigma`` px on a square grid."""
    t = torch.arange(kernel_size, dtype=torch.float64) - (kernel_size - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    k = torch.outer(g, g)
    return k / k.sum()


def motion_kernel(kernel_size: int, intensity: float, generator: torch.Generator) -> torch.Tensor:
    """A random camera-shake kernel: a smooth random trajectory rasterised with bilinear weights.

    The path has a length of about 0.6 ``kernel_size`` px; its heading performs a random walk whose
    step spread grows with ``intensity`` in [0, 1] (0: a straight line, 1: a strongly curved path).
    The kernel sums to 1 and its centre of mass is at the centre of the grid.
    """
    steps = 8 * kernel_size
    length = 0.6 * kernel_size
    heading = 2 * math.pi * torch.rand((), generator=generator, dtype=torch.float64)
    turns = torch.randn(steps, generator=generator, dtype=torch.float64) * (0.02 + 0.25 * intensity)
    angles = heading + torch.cumsum(turns, 0)
    path = torch.cumsum(torch.stack([torch.cos(angles), torch.sin(angles)], 1) * (length / steps), 0)
    path = path - path.mean(0) + (kernel_size - 1) / 2
    path = path.clamp(0, kernel_size - 1.000001)
    k = torch.zeros(kernel_size, kernel_size, dtype=torch.float64)
    base = path.floor()
    frac = path - base
    for dy in (0, 1):
        for dx in (0, 1):
            w = (frac[:, 1] if dy else 1 - frac[:, 1]) * (frac[:, 0] if dx else 1 - frac[:, 0])
            rows = (base[:, 1].long() + dy).clamp(max=kernel_size - 1)
            cols = (base[:, 0].long() + dx).clamp(max=kernel_size - 1)
            k.index_put_((rows, cols), w, accumulate=True)
    return k / k.sum()


def _reflect_fold(z: torch.Tensor, pad: int, dim: int) -> torch.Tensor:
    """Adjoint of reflection padding by ``pad`` along ``dim``: add each padded entry to its source."""
    n = z.shape[dim] - 2 * pad
    j = torch.arange(z.shape[dim], device=z.device)
    source = torch.where(j < pad, pad - j, torch.where(j >= n + pad, 2 * n - 2 - j + pad, j - pad))
    shape = list(z.shape)
    shape[dim] = n
    return torch.zeros(shape, dtype=z.dtype, device=z.device).index_add(dim, source, z)


class Blur(LinearOperator):
    """``y = k ⋆ pad_reflect(x)``, the same odd-sized kernel ``k`` on every channel.

    Args:
        kernel: a 2-D tensor of odd side length; it is normalised to sum to 1.
    """

    def __init__(self, kernel: torch.Tensor) -> None:
        super().__init__()
        check_tensor("kernel", kernel)
        if kernel.ndim != 2:
            raise ValueError("kernel must be a 2-D tensor (height, width); squeeze channel dimensions first")
        if kernel.shape[0] % 2 == 0 or kernel.shape[1] % 2 == 0:
            raise ValueError(f"kernel sides must be odd so the blur does not shift the image, got "
                             f"{tuple(kernel.shape)}; pad the kernel with one row/column of zeros")
        total = kernel.double().sum()
        if not torch.isfinite(total) or total <= 0 or (kernel < 0).any():
            raise ValueError("kernel must be non-negative, finite and not all zero")
        self.register_buffer("kernel", (kernel.double() / total).float())

    @property
    def pad(self) -> tuple[int, int]:
        return self.kernel.shape[0] // 2, self.kernel.shape[1] // 2

    def _weight(self, like: torch.Tensor) -> torch.Tensor:
        return autograd_safe(self.kernel).to(device=like.device, dtype=like.dtype)[None, None]

    def _check_size(self, h: int, w: int) -> None:
        ph, pw = self.pad
        if h <= ph or w <= pw:
            raise ValueError(f"image {h}x{w} is too small for a {self.kernel.shape[0]}x{self.kernel.shape[1]} "
                             f"blur kernel with reflection padding; use kernel_size < {2 * min(h, w) - 1}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_image(x)
        b, c, h, w = x.shape
        self._check_size(h, w)
        ph, pw = self.pad
        z = F.pad(x.reshape(b * c, 1, h, w), (pw, pw, ph, ph), mode="reflect")
        return F.conv2d(z, self._weight(x)).reshape(b, c, h, w)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        check_image(y, "y")
        b, c, h, w = y.shape
        self._check_size(h, w)
        ph, pw = self.pad
        z = F.conv_transpose2d(y.reshape(b * c, 1, h, w), self._weight(y))
        return _reflect_fold(_reflect_fold(z, pw, 3), ph, 2).reshape(b, c, h, w)

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 50, tol: float = 1e-6) -> torch.Tensor:
        """Least-squares deconvolution by CG on the normal equations (no closed form with reflection
        padding); the default 50 iterations act as the regulariser."""
        return super().pseudo_inverse(y, iterations=iterations, tol=tol)


def _check_kernel_size(kernel_size: int) -> int:
    kernel_size = check_int("kernel_size", kernel_size, minimum=1, fix="a positive odd side, e.g. 61 (the paper's)")
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd so the blur is centred on a pixel, got {kernel_size}; "
                         f"use {kernel_size - 1} or {kernel_size + 1}")
    return kernel_size


class GaussianBlur(Blur):
    """Gaussian blur; the paper's setting is a 61x61 kernel with ``sigma = 3.0`` px."""

    def __init__(self, kernel_size: int = 61, sigma: float = 3.0) -> None:
        check_number("sigma", sigma, fix="the blur's std in pixels; the paper uses 3.0")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive (in pixels), got {sigma!r}; the paper uses 3.0")
        super().__init__(gaussian_kernel(_check_kernel_size(kernel_size), float(sigma)))
        self.sigma = float(sigma)


class MotionBlur(Blur):
    """Motion blur with a random-trajectory kernel drawn once, from ``seed``, when the operator is built.

    Pass ``kernel`` to use your own (for example one estimated from the photo); then ``kernel_size``,
    ``intensity`` and ``seed`` are ignored. The paper's setting: 61x61, intensity 0.5.
    """

    def __init__(self, kernel_size: int = 61, intensity: float = 0.5, seed: int = 0,
                 kernel: torch.Tensor | None = None) -> None:
        if kernel is None:
            check_number("intensity", intensity, minimum=0, maximum=1, fix="the paper uses 0.5")
            check_int("seed", seed)
            generator = torch.Generator().manual_seed(int(seed))
            kernel = motion_kernel(_check_kernel_size(kernel_size), float(intensity), generator)
        super().__init__(kernel)


def kernel_from_image(image: torch.Tensor) -> torch.Tensor:
    """A blur kernel from a picture of the blur path drawn white on black (NCHW in [-1, 1]): the gray levels of
    the first image, normalised to sum to 1."""
    k = (image[0].float().mean(dim=0) + 1) / 2
    if k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"the kernel image is {k.shape[1]}x{k.shape[0]}; its sides must be odd (e.g. 31x31) so "
                         "the blur does not shift the picture. Crop or pad it by one pixel")
    if float(k.sum()) <= 0:
        raise ValueError("the kernel image is all black; draw the blur path in white on black")
    return k / k.sum()


def _odd(n: float) -> int:
    n = int(round(n))
    return n if n % 2 else n + 1


def _gaussian_for_side(side: int, given: dict) -> dict:
    """The paper's σ = 3 px at 256 px, scaled to the side (at least 1.5 px); the kernel covers ±3σ and stays
    below twice the side (reflection padding needs it)."""
    sigma = given.get("sigma") or max(1.5, 3.0 * side / 256)
    return {"sigma": sigma, "kernel_size": min(_odd(2 * math.ceil(3 * sigma) + 1), _odd(2 * side - 3))}


def _motion_for_side(side: int, given: dict) -> dict:
    """The paper's 61 px kernel at 256 px, scaled to the side (at least 9 px)."""
    return {"kernel_size": min(_odd(max(9, 61 * side / 256)), _odd(2 * side - 3))}


def _motion_blur(kernel_size: int, intensity: float, seed: int, kernel: torch.Tensor | None) -> MotionBlur:
    if kernel is None:
        return MotionBlur(kernel_size=kernel_size, intensity=intensity, seed=seed)
    return MotionBlur(kernel=kernel_from_image(kernel))


_KERNEL_HELP = "Blur kernel side in pixels, odd (the paper: 61 at 256 px). Must be smaller than the image."
SPECS = (
    OperatorSpec(
        name="gaussian_blur", display_name="Gaussian Blur", order=30,
        description="Sharpen an out-of-focus picture: the blur is Gaussian, of a known radius.",
        measurement="the picture blurred by a Gaussian of standard deviation sigma px, at full size",
        params=(
            Param("kernel_size", "int", default=61, min=1, max=255, step=2, label="Blur kernel size (px)",
                  help=_KERNEL_HELP),
            Param("sigma", "float", default=3.0, min=0.1, max=100.0, step=0.1, label="Gaussian blur sigma (px)",
                  help="Blur radius (standard deviation) in pixels (the paper: 3 at 256 px)."),
        ),
        factory=GaussianBlur,
        aliases=("deblur", "blur", "sharpen", "out of focus", "defocus", "soft", "restore"),
        sized_defaults=_gaussian_for_side,
        tasks=(Task("gaussian_deblur"),),
    ),
    OperatorSpec(
        name="motion_blur", display_name="Motion Blur", order=40,
        description="Sharpen a shaken (motion-blurred) picture; the blur path is random (seeded) or drawn by you "
                    "as a kernel image.",
        measurement="the picture smeared along the blur path, at full size",
        params=(
            Param("kernel_size", "int", default=61, min=3, max=255, step=2, label="Blur kernel size (px)",
                  help=_KERNEL_HELP + " The random path is about 0.6 x this long."),
            Param("intensity", "float", default=0.5, min=0.0, max=1.0, step=0.01, label="Motion blur intensity",
                  help="How curved the random path is, from 0 (a straight line) to 1 (strongly curved); the "
                       "paper: 0.5."),
            Param("seed", "int", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, label="Motion kernel seed",
                  help="Which random path (any whole number)."),
            Param("kernel", "image", optional=True, label="Kernel image",
                  help="Optional: a white-on-black image of the blur path with odd sides in pixels; it replaces "
                       "the random path (size, intensity and seed are then ignored)."),
        ),
        factory=_motion_blur,
        aliases=("deblur", "blur", "sharpen", "camera shake", "shake", "motion", "restore"),
        sized_defaults=_motion_for_side,
        tasks=(Task("motion_deblur", draw=lambda shape, seed: {"seed": seed}),),
    ),
)
