"""Simple restorations that DPS must beat: interpolation, mean fill, the measurement itself,
pseudo-inverses and, for phase retrieval, Fienup's hybrid input-output algorithm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..operators import Inpainting, LinearOperator, PhaseRetrieval, SuperResolution


def bicubic_upsample(y: torch.Tensor, factor: int) -> torch.Tensor:
    return F.interpolate(y, scale_factor=factor, mode="bicubic", align_corners=False).clamp(-1, 1)


def mean_fill(y: torch.Tensor, op: Inpainting) -> torch.Tensor:
    """Missing pixels set to the mean of the measured ones (per sample and channel)."""
    keep = op.adjoint(torch.ones_like(y))
    mean = (y * keep).sum((-2, -1), keepdim=True) / keep.sum((-2, -1), keepdim=True).clamp_min(1e-6)
    return y * keep + mean * (1 - keep)


def smooth_fill(y: torch.Tensor, op: Inpainting, sigma: float = 1.5, passes: int = 4) -> torch.Tensor:
    """Normalised convolution: missing pixels from a Gaussian-weighted average of measured neighbours,
    repeated with growing support so large holes fill too."""
    keep = op.adjoint(torch.ones_like(y))
    out = mean_fill(y, op)
    for i in range(passes):
        s = sigma * (2**i)
        k = int(2 * round(3 * s) + 1)
        t = torch.arange(k, dtype=y.dtype, device=y.device) - k // 2
        g = torch.exp(-0.5 * (t / s) ** 2)
        g = (g / g.sum())
        w = g[None, None, :, None] * g[None, None, None, :]
        c = y.shape[1]
        pad = min(k // 2, y.shape[-1] - 1, y.shape[-2] - 1)
        w = w[..., k // 2 - pad:k // 2 + pad + 1, k // 2 - pad:k // 2 + pad + 1].expand(c, 1, -1, -1)
        num = F.conv2d(F.pad(y * keep, (pad,) * 4, mode="reflect"), w, groups=c)
        den = F.conv2d(F.pad(keep, (pad,) * 4, mode="reflect"), w, groups=c)
        filled = torch.where(den > 1e-3, num / den.clamp_min(1e-3), out)
        out = torch.where(keep > 0.5, y, filled)
    return out


def hio(y: torch.Tensor, op: PhaseRetrieval, iterations: int = 300, beta: float = 0.9,
        generator: torch.Generator | None = None) -> torch.Tensor:
    """Fienup's hybrid input-output (1982) with the support of the unpadded image and values in [-1, 1],
    from a random start; the classical non-learned solver for this measurement."""
    h, w = op.image_size(*y.shape[-2:])
    ph, pw = op.padding(h, w)
    x = torch.rand((y.shape[0], y.shape[1], h, w), generator=generator, dtype=y.dtype).to(y.device) * 2 - 1
    z = F.pad(x, (pw, pw, ph, ph))
    support = F.pad(torch.ones_like(x), (pw, pw, ph, ph)) > 0.5
    for _ in range(iterations):
        spec = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
        spec = y.clamp_min(0) * torch.exp(1j * spec.angle())
        z_new = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(spec, dim=(-2, -1)), norm="ortho"),
                                   dim=(-2, -1)).real
        ok = support & (z_new >= -1) & (z_new <= 1)
        z = torch.where(ok, z_new, z - beta * z_new)
    return z[..., ph:ph + h, pw:pw + w].clamp(-1, 1)


def candidates(op, y: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """The baselines that apply to ``op``, by name."""
    out: dict[str, torch.Tensor] = {}
    if isinstance(op, SuperResolution):
        out["bicubic"] = bicubic_upsample(y, op.factor)
    if isinstance(op, Inpainting):
        out["mean fill"] = mean_fill(y, op)
        out["smooth fill"] = smooth_fill(y, op)
    if isinstance(op, PhaseRetrieval):
        out["HIO"] = hio(y, op, generator=generator)
    if isinstance(op, LinearOperator) and y.shape[-2:] != (0, 0):
        if not isinstance(op, Inpainting):
            out["pseudo-inverse"] = op.pseudo_inverse(y).clamp(-1, 1)
        if y.shape == op.adjoint(y).shape and not isinstance(op, Inpainting):
            out["measurement"] = y.clamp(-1, 1)
    return out
