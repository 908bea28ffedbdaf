"""Measurement noise models: each simulates ``y = A(x) + n`` and supplies the residual guidance uses.

Guidance differentiates the per-sample norm of ``residual(y, A(x̂0))`` (``distance``). For Gaussian
noise this is the plain ‖y − A(x̂0)‖ of the official DPS code (Chung et al. 2023, ``condition_methods.py``),
computed per sample rather than over the whole batch. Units: images and measurements live in [-1, 1],
so the paper's ``sigma = 0.05`` is 0.025 on [0, 1] images.
"""

from __future__ import annotations

import torch

from .validate import check_number


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise drawn on the generator's device, then moved to ``x``'s."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=torch.float32).to(x.device, x.dtype)


class NoiseModel:
    """Base of the noise models; ``distance`` is the per-sample norm of ``residual``."""

    def sample(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    def residual(self, y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        return y - ax

    def distance(self, y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        """Per-sample ‖residual(y, A x)‖₂, shape (B,)."""
        if y.shape[1:] != ax.shape[1:]:
            raise ValueError(f"measurement shape {tuple(y.shape)} does not match A(x) of shape {tuple(ax.shape)}; "
                             "the measurement must be made with the same operator and image size")
        return self.residual(y, ax).flatten(1).norm(dim=1)

    def expected_distance(self, y: torch.Tensor) -> torch.Tensor:
        """Per-sample E‖residual(y, A x0)‖ at the true image, ≈ √(E‖n‖²): the floor below which fitting
        ``y`` only fits the noise (used by the "polyak" step rule). Shape (B,) for ``y`` of batch B."""
        return y.new_zeros(y.shape[0])


class Noiseless(NoiseModel):
    """``y = A(x)`` exactly."""

    def sample(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return clean.clone()

    def __repr__(self) -> str:
        return "Noiseless()"


class Gaussian(NoiseModel):
    """``y = A(x) + sigma·ε``, ε ~ N(0, I); ``sigma`` in units of the [-1, 1] range (paper: 0.05)."""

    def __init__(self, sigma: float = 0.05) -> None:
        self.sigma = check_number("sigma", sigma, minimum=0,
                                  fix="the noise std on the [-1, 1] range; the paper uses 0.05")

    def sample(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return clean + self.sigma * _randn_like(clean, generator)

    def expected_distance(self, y: torch.Tensor) -> torch.Tensor:
        """σ√m for m measured values per sample (E‖n‖² = mσ²)."""
        return y.new_full((y.shape[0],), self.sigma * y[0].numel() ** 0.5)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"


class Poisson(NoiseModel):
    """Photon-counting noise: ``k ~ Poisson(c·u)`` with ``u = (A(x) + 1) / 2`` and ``c = 255·rate``,
    reported as ``y = 2k/c − 1`` (the official code's convention of 255·rate counts at full white,
    without its final clamp, which would bias bright pixels).

    Residual. The Poisson negative log-likelihood ``λ − k log λ`` expanded to second order around its
    minimum ``λ = k`` is ``(λ − k)² / (2k)``: a residual weighted by 1/√k. It is infinite at k = 0, as is
    the official ``‖r‖/|y|``. We use the weight ``1/√(k + 1)`` (finite everywhere, equal to the expansion
    for bright pixels), normalised per sample to a mean square of one so that ``zeta`` keeps the scale
    it has with Gaussian noise:

        r_i = (y_i − A(x)_i) · w_i,   w_i = sqrt( mean_j(k_j + 1) / (k_i + 1) ),   k = c (y + 1) / 2.

    The weights depend on ``y`` only, so they are constants for the gradient.
    """

    def __init__(self, rate: float = 1.0) -> None:
        self.rate = check_number("rate", rate, above=0, fix="255·rate photons at full white; try 1.0")

    @property
    def counts_at_white(self) -> float:
        return 255.0 * self.rate

    def sample(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.counts_at_white
        intensity = ((clean.float() + 1) / 2).clamp(0, 1) * c
        device = generator.device if generator is not None else intensity.device
        k = torch.poisson(intensity.to(device), generator=generator).to(clean.device)
        return (2 * k / c - 1).to(clean.dtype)

    def residual(self, y: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
        k_plus_1 = (self.counts_at_white * (y.detach() + 1) / 2).clamp_min(0) + 1
        weights = (k_plus_1.flatten(1).mean(1).view(-1, *([1] * (y.ndim - 1))) / k_plus_1).sqrt()
        return (y - ax) * weights

    def expected_distance(self, y: torch.Tensor) -> torch.Tensor:
        """√(Σ_i w_i² Var y_i) with Var y_i = 4λ_i/c² and the rate λ_i estimated by the count k_i:
        ``2/c · √(mean_j(k_j + 1) · Σ_i k_i/(k_i + 1))``."""
        c = self.counts_at_white
        k = (c * (y.detach() + 1) / 2).clamp_min(0)
        return 2 / c * ((k + 1).flatten(1).mean(1) * (k / (k + 1)).flatten(1).sum(1)).sqrt()

    def __repr__(self) -> str:
        return f"Poisson(rate={self.rate})"
