"""The demo application's samplers of an embedded prior, shared by ``demo`` and ``restore``.

* ``ddpm``: the official DPS loop (ancestral DDPM respaced to ``steps``, guided by a step rule; ``dps.sampling``).
* ``proximal``: the proximal sampler (``dps.sampling.proximal_sample``): at each of ``steps`` levels of the
  hosts' "normal" schedule, x0_hat moved by one gradient step through the prior and then made to fit the
  measurement (``dps.proximal``, (2) and (1), λ = ``LAMBDA``/ζ), then fresh noise. Measured: 30 such steps reach
  the official 1000-step loop's quality on super-resolution (−0.03 dB) and pass it on box inpainting and
  deblurring (bench/README.md, *The pull through the denoiser*).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..guidance import DPSGuidance
from ..proximal import LAMBDA
from ..sampling import ddpm_sample, eps_denoiser, proximal_sample
from ..schedule import alphas_cumprod_from_betas, linear_betas, timestep_sigmas
from .prior import Prior

SAMPLERS = ("ddpm", "proximal")


def draw(prior: Prior, shape: tuple[int, ...], steps: int, guidance: DPSGuidance | None, sampler: str = "ddpm",
         seed: int = 0, clip_x0: bool = True, callback: Callable[[dict], None] | None = None,
         show_progress: bool = False) -> torch.Tensor:
    """``shape`` samples of ``prior`` (latents for a latent prior) in ``steps`` steps of ``sampler``, guided by
    ``guidance`` (None: the prior's own DDPM sample, whatever the sampler). ``clip_x0``: DDPM's x0_hat clipped to
    [-1, 1] as the official code does (pixel priors)."""
    generator = torch.Generator().manual_seed(seed)
    if sampler == "ddpm" or guidance is None:
        return ddpm_sample(prior.eps_model(), shape, steps=steps, guidance=guidance, clip_x0=clip_x0,
                           generator=generator, callback=callback, show_progress=show_progress)
    if sampler != "proximal":
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    alphas_cumprod = alphas_cumprod_from_betas(linear_betas())
    sigmas = timestep_sigmas(alphas_cumprod, steps)
    x = torch.randn(shape, generator=generator) * sigmas[0]
    return proximal_sample(eps_denoiser(prior.eps_model(), alphas_cumprod), x, sigmas, guidance,
                           lam=LAMBDA / guidance.zeta, generator=generator, callback=callback,
                           show_progress=show_progress)
