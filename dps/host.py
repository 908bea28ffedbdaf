"""Small host-agnostic helpers for adapters that guide a host's σ-space denoiser (ComfyUI, the WebUI).

Nothing here imports a host. The helpers cover what every adapter repeats: image layout conversion,
leaving the host's inference mode for autograd, locating the current step in the host's σ schedule,
and turning a ``GuidanceResult`` into the guided denoised prediction exactly as
``dps.sampling.GuidedDenoiser`` does.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .guidance import DPSGuidance, GuidanceResult, denoised_correction, rms, x0_jacobian

# The step rule and strength the host nodes start with. Measured by ``bench/host_defaults.py`` (the host path
# rehearsed with the SD1.x-latent prior, the real TAESD decoder, 20 steps; results in bench/README.md): the
# "polyak" rule at one ζ beats the simple baselines on super-resolution, inpainting and deblurring with Euler,
# where no constant-rule ζ did (the best constant ζ differed tenfold between tasks).
HOST_RULE = "polyak"
HOST_ZETA = 1.0


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """A host IMAGE (B, H, W, C) in [0, 1] as an NCHW batch in [-1, 1] (float32, RGB only)."""
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"expected an image batch (B, H, W, C), got shape {tuple(image.shape)}")
    return image[..., :3].movedim(-1, 1).float() * 2 - 1


def nchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """An NCHW batch in [-1, 1] as a host IMAGE (B, H, W, 3) in [0, 1] (1 channel is repeated; no clamp)."""
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return ((x.float() + 1) / 2).movedim(1, -1).contiguous()


def match_channels(y: torch.Tensor, channels: int) -> torch.Tensor:
    """Fit an RGB measurement to an operator with ``channels`` output channels (gray images come back as RGB)."""
    if y.shape[1] == channels:
        return y
    if channels == 1:
        return y.mean(dim=1, keepdim=True)
    raise ValueError(f"the measurement has {y.shape[1]} channels but the operator produces {channels}; "
                     "make the measurement with the same operator (DPS Measure)")


def make_autograd_safe(modules: Iterable[nn.Module | None]) -> int:
    """Replace inference-tensor parameters and buffers of ``modules`` by normal copies, in place.

    Hosts load weights under ``torch.inference_mode()``; such tensors cannot be saved for backward,
    so a gradient through the network fails. Copies are made outside inference mode, once (already
    normal tensors are skipped), with ``requires_grad=False`` so no weight gradient is kept. Later
    inference runs use the normal tensors unchanged. Returns the number of tensors replaced.
    """
    replaced = 0
    with torch.inference_mode(False), torch.no_grad():
        for module in modules:
            if module is None:
                continue
            for sub in module.modules():
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.is_inference():
                        sub._parameters[name] = nn.Parameter(p.clone(), requires_grad=False)
                        replaced += 1
                for name, b in list(sub._buffers.items()):
                    if b is not None and b.is_inference():
                        sub._buffers[name] = b.clone()
                        replaced += 1
    return replaced


def needs_autograd_fix(modules: Iterable[nn.Module | None]) -> bool:
    """Whether any parameter or buffer of ``modules`` is an inference tensor."""
    for module in modules:
        if module is None:
            continue
        for t in list(module.parameters()) + list(module.buffers()):
            if t.is_inference():
                return True
    return False


def normal_tensor(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that autograd may save (made outside inference mode), detached."""
    with torch.inference_mode(False):
        return t.detach().clone()


def schedule_step(sigma: float, sigmas: torch.Tensor | None) -> float | None:
    """The σ decrease from ``sigma`` to the next level of the sampler's schedule, or None when unknown.

    Samplers that evaluate between schedule levels (Heun's second stage, DPM-2, multistep) get the
    distance to the next schedule level below ``sigma``.
    """
    if sigmas is None or sigma <= 0:
        return None
    levels = [float(s) for s in sigmas.flatten().tolist()]
    below = [s for s in levels if s < sigma * (1 - 1e-5)]
    if not below:
        return None
    return sigma - max(below)


def guided_denoised(result: GuidanceResult, guidance: DPSGuidance, sigma: float, delta_sigma: float | None,
                    x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``D' = x0_hat + correction`` for one σ-space evaluation, as ``dps.sampling.GuidedDenoiser``.

    ``result.grad`` is per sample; ``sigma`` the current level; ``delta_sigma`` the step (None: the
    posterior-score form); ``alpha`` the signal scale of ``x = α x0 + σε`` (1 − σ for flow models).
    The step the correction causes is checked for divergence.
    """
    grad = guidance.step_gradient(result, x0_jacobian(sigma, guidance.sigma_data, alpha), limit=rms(x))
    correction = denoised_correction(grad, sigma, delta_sigma, guidance.rule, guidance.zeta, alpha)
    scale = (delta_sigma / sigma) if delta_sigma else 1.0
    step = guidance.check_step(correction * scale, x)
    return result.x0_hat + (step / scale).to(result.x0_hat.dtype)
