"""A Gaussian-mixture prior with analytic scores and an exact linear-Gaussian posterior.

The MCG-Diff protocol (Cardoso et al., ICLR 2024; used by TMPD and benchopt): 25 unit-covariance
components with means ``(−8i, −8j, −8i, −8j, …)``, i, j ∈ {−2, …, 2}; VP noising keeps unit covariance,
so ``p_t = Σ_k w_k N(√ᾱ_t μ_k, I)`` and ``ε(x_t, t) = −√(1 − ᾱ_t) ∇log p_t(x_t)`` in closed form. With
``y = A x + σ_y n`` the posterior is again a mixture: ``C = (I + AᵀA/σ_y²)⁻¹``, ``m_k = C(Aᵀy/σ_y² + μ_k)``,
weights ∝ ``w_k N(y; A μ_k, σ_y² I + AAᵀ)``. Vectors are stored as (B, d, 1, 1) so the project's
operators and guidance apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..operators import LinearOperator


def mixture_means(dim: int) -> torch.Tensor:
    """The 25 means (25, dim): (−8i, −8j) repeated ``dim/2`` times."""
    if dim % 2:
        raise ValueError(f"dim must be even, got {dim}")
    grid = torch.tensor([(-8.0 * i, -8.0 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    return grid.repeat(1, dim // 2)


class MatrixOperator(LinearOperator):
    """``y = M x`` for vectors stored as (B, d, 1, 1)."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.matrix.to(device=x.device, dtype=x.dtype)
        return torch.einsum("yx,bxhw->byhw", m, x)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        m = self.matrix.to(device=y.device, dtype=y.dtype)
        return torch.einsum("yx,byhw->bxhw", m, y)

    def pseudo_inverse(self, y: torch.Tensor, iterations: int = 0, tol: float = 0.0) -> torch.Tensor:
        pinv = torch.linalg.pinv(self.matrix.double()).to(device=y.device, dtype=y.dtype)
        return torch.einsum("xy,byhw->bxhw", pinv, y)


@dataclass
class GaussianMixture:
    """A mixture of unit-covariance Gaussians ``Σ_k w_k N(μ_k, I)``."""

    means: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def mcg_diff(cls, dim: int, generator: torch.Generator | None = None, uniform: bool = False) -> GaussianMixture:
        """The benchmark prior; weights ``randn²`` normalised (MCG-Diff), or uniform."""
        w = torch.ones(25, dtype=torch.float64) if uniform else torch.randn(25, generator=generator,
                                                                              dtype=torch.float64) ** 2
        return cls(mixture_means(dim), w / w.sum())

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + torch.randn(n, self.dim, generator=generator, dtype=torch.float64)

    def eps(self, x_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        """The exact ε-prediction at ``x_t`` (B, d, 1, 1) for per-sample ᾱ (B,)."""
        x = x_t.flatten(1).double()
        ac = alpha_cumprod.double().view(-1, 1, 1)
        mu = ac.sqrt() * self.means.to(x.device)[None]                       # (B, K, d)
        logits = self.weights.to(x.device).log()[None] - 0.5 * (x[:, None] - mu).square().sum(-1)
        resp = logits.softmax(dim=1)                                          # (B, K)
        score = (resp[..., None] * (mu - x[:, None])).sum(1)                  # ∇log p_t
        eps = -(1 - ac.view(-1, 1)).sqrt() * score
        return eps.to(x_t.dtype).view_as(x_t)

    def eps_model(self, alphas_cumprod: torch.Tensor):
        """An ``eps_model(x, t)`` for ``dps.sampling`` (t: training indices into ``alphas_cumprod``)."""
        def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.eps(x, alphas_cumprod.to(x.device)[t])
        return model

    def posterior(self, matrix: torch.Tensor, y: torch.Tensor, sigma_y: float) -> MixturePosterior:
        """The exact posterior given ``y = matrix x + sigma_y n`` (y of shape (d_y,))."""
        a = matrix.double()
        y = y.double().flatten()
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov = torch.linalg.inv(eye + a.T @ a / sigma_y**2)
        means = (a.T @ y / sigma_y**2 + self.means) @ cov.T                 # m_k = C(Aᵀy/σ² + μ_k)
        marginal = sigma_y**2 * torch.eye(a.shape[0], dtype=torch.float64) + a @ a.T
        diff = y[None] - self.means @ a.T
        log_lik = -0.5 * (diff @ torch.linalg.inv(marginal) * diff).sum(1)
        logw = self.weights.log() + log_lik
        return MixturePosterior(means, (logw - logw.logsumexp(0)).exp(), cov)


@dataclass
class MixturePosterior:
    """A mixture whose components share the covariance ``cov``."""

    means: torch.Tensor
    weights: torch.Tensor
    cov: torch.Tensor

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.cov)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return self.means[k] + z @ chol.T


def random_problem(dim_x: int, dim_y: int, generator: torch.Generator) -> torch.Tensor:
    """A (d_y, d_x) measurement matrix: a Gaussian matrix whose singular values are replaced by
    sorted U(0, 1) draws (MCG-Diff protocol)."""
    a = torch.randn(dim_y, dim_x, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    s = torch.rand(dim_y, generator=generator, dtype=torch.float64).sort(descending=True).values
    return u @ torch.diag(s) @ vh


def as_image(v: torch.Tensor) -> torch.Tensor:
    """(B, d) vectors as (B, d, 1, 1) 'images'."""
    return v.reshape(v.shape[0], -1, 1, 1)


__all__ = ["GaussianMixture", "MixturePosterior", "MatrixOperator", "random_problem", "as_image", "mixture_means"]
