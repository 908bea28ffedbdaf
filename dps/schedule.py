"""Noise schedules: the DDPM linear β schedule, respacing, and the σ-space view of it.

DDPM (Ho et al. 2020; DPS's ``diffusion_config.yaml``): β linear from 1e-4 to 0.02 over 1000 steps,
``ᾱ_t = ∏(1 − β_s)``, ``x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε``. The same process in σ-space (k-diffusion,
ComfyUI, the WebUI) is ``x_t / √ᾱ_t = x_0 + σ_t ε`` with ``σ_t = √((1 − ᾱ_t) / ᾱ_t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .validate import check_int, check_number, check_tensor


def linear_betas(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """The linear β schedule, scaled as the official code (``scale = 1000 / num_steps``)."""
    check_int("num_steps", num_steps, minimum=1)
    check_number("beta_start", beta_start, above=0, below=1)
    check_number("beta_end", beta_end, above=0, below=1)
    scale = 1000.0 / num_steps
    return torch.linspace(scale * beta_start, scale * beta_end, num_steps, dtype=torch.float64)


@dataclass(frozen=True)
class Respaced:
    """A subsequence of the training timesteps with the β's that make it a Markov chain of its own.

    ``timesteps[i]`` is the training index of sampling step i (increasing); ``betas[i] = 1 − ᾱ_{t_i} / ᾱ_{t_{i−1}}``
    (Nichol & Dhariwal 2021, ``space_timesteps``).
    """

    timesteps: torch.Tensor
    alphas_cumprod: torch.Tensor
    betas: torch.Tensor


def respace(alphas_cumprod: torch.Tensor, steps: int) -> Respaced:
    """Keep ``steps`` evenly spaced timesteps of a trained schedule, always including the last."""
    check_alphas_cumprod(alphas_cumprod)
    check_int("steps", steps)
    total = alphas_cumprod.shape[0]
    if not 1 <= steps <= total:
        raise ValueError(f"steps must lie in [1, {total}], got {steps}")
    timesteps = torch.linspace(0, total - 1, steps, dtype=torch.float64).round().long()
    ac = alphas_cumprod[timesteps]
    prev = torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
    return Respaced(timesteps=timesteps, alphas_cumprod=ac, betas=1 - ac / prev)


def check_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``alphas_cumprod`` if it is a 1-D finite floating tensor (a trained schedule's ᾱ_t); ValueError/TypeError
    otherwise."""
    check_tensor("alphas_cumprod", alphas_cumprod, ndim=1, floating=True, finite=True,
                 fix="e.g. dps.alphas_cumprod_from_betas(dps.linear_betas())")
    return alphas_cumprod


def check_betas(betas: torch.Tensor) -> torch.Tensor:
    """``betas`` if it is a 1-D finite tensor with every β in (0, 1); ValueError/TypeError otherwise."""
    check_tensor("betas", betas, ndim=1, floating=True, finite=True, fix="e.g. dps.linear_betas()")
    if len(betas) == 0 or not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError("betas must be a non-empty schedule with every β in (0, 1); e.g. dps.linear_betas()")
    return betas


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """``sigmas`` if they are sampler noise levels: a 1-D tensor of at least two finite values >= 0, strictly
    decreasing (the last may be 0), as ``sigmas_karras`` makes them."""
    check_tensor("sigmas", sigmas, ndim=1, finite=True, fix="noise levels must be finite; e.g. sigmas_karras(20, 0.03, 14.6)")
    if len(sigmas) < 2:
        raise ValueError(f"sigmas needs at least two noise levels (start and end), got {len(sigmas)}; e.g. "
                         "sigmas_karras(20, 0.03, 14.6)")
    if bool((sigmas < 0).any()) or not bool((sigmas[1:] < sigmas[:-1]).all()):
        raise ValueError(f"sigmas must decrease strictly from the largest noise level to the smallest (or 0), got "
                         f"{[round(float(v), 4) for v in sigmas[:6]]}{'...' if len(sigmas) > 6 else ''}; sort them "
                         "with sigmas.sort(descending=True).values")
    return sigmas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    check_tensor("betas", betas, ndim=1, floating=True, finite=True, fix="e.g. dps.linear_betas()")
    return torch.cumprod(1 - betas, dim=0)


def sigma_from_alpha_cumprod(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """σ = √((1 − ᾱ) / ᾱ), the variance-exploding noise level of a VP timestep."""
    return ((1 - alpha_cumprod) / alpha_cumprod).sqrt()


def vp_sigma(alpha_cumprod: float) -> float:
    """``sigma_from_alpha_cumprod`` for one ᾱ as a float (0 at ᾱ = 1)."""
    return math.sqrt(max(1.0 - alpha_cumprod, 0.0) / alpha_cumprod)


def timestep_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """σ levels of ``steps`` training timesteps evenly spaced from the last to the first (``linspace(T − 1, 0)``,
    rounded; the hosts' "normal" schedule for a discrete VP model), as ``sigma_from_alpha_cumprod``, then 0."""
    check_alphas_cumprod(alphas_cumprod)
    check_int("steps", steps, minimum=1, maximum=len(alphas_cumprod))
    t = torch.linspace(len(alphas_cumprod) - 1, 0, steps).round().long()
    return torch.cat([sigma_from_alpha_cumprod(alphas_cumprod[t].float()), torch.zeros(1)])


def sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022, eq. 5) noise levels, with a final 0 appended."""
    check_int("n", n, minimum=1)
    sigma_min = check_number("sigma_min", sigma_min, above=0)
    check_number("sigma_max", sigma_max, above=sigma_min, fix="sigma_max must exceed sigma_min")
    check_number("rho", rho, above=0)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv = sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    return torch.cat([inv**rho, torch.zeros(1, dtype=torch.float64)])
