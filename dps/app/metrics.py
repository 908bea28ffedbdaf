"""Image and distribution metrics: PSNR, SSIM and (max-)sliced Wasserstein distances."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(x: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB, ``10 log10(range² / MSE)``; ``data_range`` 2 for [-1, 1] images."""
    mse = (x.float() - reference.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim(x: torch.Tensor, reference: torch.Tensor, data_range: float = 2.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Per-sample SSIM (Wang et al. 2004): Gaussian window 11 px, σ = 1.5, K1 = 0.01, K2 = 0.03,
    averaged over pixels (valid region) and channels."""
    x, reference = x.float(), reference.float()
    window = min(window, x.shape[-1], x.shape[-2])
    t = torch.arange(window, dtype=torch.float32, device=x.device) - (window - 1) / 2
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = (g / g.sum())
    kernel = torch.outer(g, g)[None, None].expand(x.shape[1], 1, window, window)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(z, kernel, groups=x.shape[1])

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(reference)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(reference * reference) - mu_y**2
    cov = blur(x * reference) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def _projections(dim: int, n: int, generator: torch.Generator | None, dtype: torch.dtype) -> torch.Tensor:
    theta = torch.randn(n, dim, generator=generator, dtype=dtype)
    return theta / theta.norm(dim=1, keepdim=True)


def _sliced_w2_squared(a: torch.Tensor, b: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Squared 1-D Wasserstein-2 distance of the projected samples, per slice (quantile matching)."""
    pa, pb = (a @ theta.T).sort(dim=0).values, (b @ theta.T).sort(dim=0).values
    n = min(len(pa), len(pb))
    levels = (torch.arange(n, dtype=a.dtype) + 0.5) / n
    qa = pa[(levels * len(pa)).long().clamp(max=len(pa) - 1)]
    qb = pb[(levels * len(pb)).long().clamp(max=len(pb) - 1)]
    return (qa - qb).square().mean(0)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, slices: int = 1000,
                       generator: torch.Generator | None = None) -> float:
    """Sliced Wasserstein-2 distance between sample sets (N, d) and (M, d): sqrt of the mean over
    random unit directions of the squared 1-D W2 (the convention of POT's ``sliced_wasserstein_distance``)."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    theta = _projections(a.shape[1], slices, generator, a.dtype)
    return float(_sliced_w2_squared(a, b, theta).mean().sqrt())


def max_sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = 100,
                           generator: torch.Generator | None = None) -> float:
    """Max over ``projections`` random directions of the 1-D W2 distance (benchopt's max-SW protocol)."""
    a, b = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    theta = _projections(a.shape[1], projections, generator, a.dtype)
    return float(_sliced_w2_squared(a, b, theta).max().sqrt())
