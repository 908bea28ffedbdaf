"""Small host-agnostic helpers for adapters that guide a host's σ-space denoiser (ComfyUI, the WebUI).

Nothing here imports a host. The helpers cover what every adapter repeats: image layout conversion,
leaving the host's inference mode for autograd (``dps.autograd_safe``, re-exported), locating the current step
in the host's σ schedule, and turning a ``GuidanceResult`` into the guided denoised prediction (σ-space samplers,
as ``dps.sampling.GuidedDenoiser`` does) or the guided ε (timestep samplers: DDIM, PLMS).
"""

from __future__ import annotations

import math

import torch

from .autograd_safe import make_autograd_safe, needs_autograd_fix, normal_tensor
from .guidance import DPSGuidance, GuidanceResult, rms, vp_x0_jacobian, x0_jacobian
from .rules import DEFAULTS, per_sample
from .samplers import StageClock
from .schedule import vp_sigma
from .validate import check_tensor

__all__ = ["HOST_RULE", "HOST_ZETA", "image_to_nchw", "nchw_to_image", "match_channels", "make_autograd_safe",
           "needs_autograd_fix", "normal_tensor", "schedule_step", "guided_correction", "guided_denoised",
           "eps_correction", "FINAL_ITERATIONS", "is_last_step", "final_refinement", "final_stage_refinement",
           "step_limit", "MOVE_SHARE"]

# The step rule and strength the host nodes start with: the σ-space family's default (``dps.rules.DEFAULTS``).
# Measured by ``bench/host_defaults.py`` (the host path rehearsed with the SD1.x-latent prior, the real TAESD
# decoder, 20 steps; results in bench/README.md): the "polyak" rule at one ζ beats the simple baselines on
# super-resolution, inpainting and deblurring with Euler, where no constant-rule ζ did (the best constant ζ
# differed tenfold between tasks).
HOST_RULE = DEFAULTS["sigma"].rule
HOST_ZETA = DEFAULTS["sigma"].zeta


def image_to_nchw(image: torch.Tensor) -> torch.Tensor:
    """A host IMAGE (B, H, W, C) in [0, 1] as an NCHW batch in [-1, 1] (float32, RGB only)."""
    check_tensor("image", image)
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


def schedule_step(sigma: float, sigmas: torch.Tensor | None, stages: StageClock | None = None) -> float | None:
    """The σ decrease from ``sigma`` to the next level of the sampler's schedule, or None when unknown.

    Samplers that evaluate between schedule levels (Heun's second stage, DPM-2, multistep) get the
    distance to the next schedule level below ``sigma``; a sampler with steps of its own (``stages``, a
    ``StageClock`` that has seen ``sigma``: DPM-Solver-fast) the size of the step that starts at ``sigma``.
    """
    own = stages.step_size(sigma) if stages is not None else None
    if own is not None:
        return own
    if sigmas is None or sigma <= 0:
        return None
    levels = [float(s) for s in sigmas.flatten().tolist()]
    below = [s for s in levels if s < sigma * (1 - 1e-5)]
    if not below:
        return None
    return sigma - max(below)


# The share of the next level's size that one guided step may move x by (``step_limit``).
MOVE_SHARE = 0.35


def step_limit(x: torch.Tensor, x0_hat: torch.Tensor, sigma: float, delta_sigma: float | None,
               scale: float = 1.0, share: float = MOVE_SHARE) -> torch.Tensor:
    """The trust region of a σ-space correction ``c``, per sample: a bound on RMS(c).

    Two bounds, the smaller holds: RMS(c) ≤ RMS(x) (``DPSGuidance.step_gradient``: guidance never moves the
    prediction by more than the sample's own size), and, when the step is known and does not end at σ = 0 (whose
    prediction is the sample), the move ``(Δσ/σ)·c`` one Euler step makes of it at most ``share`` times the size
    the sample should have at the next level, ``√(σ_next² + RMS(x0_hat)²)`` (x = x0 + σ_next ε). Why the second:
    the Euler step lands on ``x0_hat + σ_next ε + (Δσ/σ)c``, and a move larger than the noise left at σ_next is
    no longer absorbed as noise by the later steps but stays in the sample as content off the prior's manifold.
    With many steps (Δσ ≪ σ_next) the first bound is the smaller and this one never acts; with few it does: 7
    Euler steps of the SD1.x-latent prior on x4 super-resolution took the latent to 5.7x its data RMS at σ = 0.58
    and read 16.8 dB without it, 25.0 dB with it (``bench/README.md``, *Few steps*). ``scale``: the units of ``x``
    per unit of ``x0 + σε`` (``√ᾱ`` for the VP ``x_t`` of timestep samplers, ``eps_correction``; 1 in σ-space);
    ``share``: ``MOVE_SHARE`` unless a benchmark asks for another (``inf``: no second bound, as before it
    existed)."""
    limit = rms(x)
    sigma_next = sigma - delta_sigma if delta_sigma is not None else 0.0
    if delta_sigma is None or delta_sigma <= 0 or sigma_next <= 0:
        return limit      # unknown step, or the step to σ = 0: what it leaves is the sample, no later step absorbs it
    size_next = (sigma_next**2 + rms(x0_hat).square()).sqrt()
    return torch.minimum(limit, share * scale * size_next * (sigma / delta_sigma))


def guided_correction(result: GuidanceResult, guidance: DPSGuidance, sigma: float, delta_sigma: float | None,
                      x: torch.Tensor, alpha: float = 1.0, move_share: float = MOVE_SHARE) -> torch.Tensor:
    """The correction ``c`` of ``D' = x0_hat + c`` for one σ-space evaluation (``guided_denoised``), in
    ``result.x0_hat``'s dtype, within the trust region ``step_limit`` (``move_share``: its ``share``). The step
    it causes in one Euler step, ``(Δσ/σ)·c``, is checked for divergence. A rule that replaces the prediction
    (``"proximal"``, ``StepRule.prediction``) gives ``c = x0' − x0_hat`` at the level σ/α of x/α = x0 + (σ/α)ε,
    without the trust region (its step is a bounded least-squares solve)."""
    replaced = guidance.step_rule.prediction(guidance, result, sigma / alpha, alpha)   # x = α(x0 + (σ/α)ε)
    if replaced is not None:
        return guidance.check_step(replaced - result.x0_hat, x).to(result.x0_hat.dtype)
    limit = step_limit(x, result.x0_hat, sigma, delta_sigma, share=move_share)
    grad = guidance.step_gradient(result, x0_jacobian(sigma, guidance.sigma_data, alpha), limit=limit)
    correction = guidance.step_rule.denoised_correction(grad, sigma, delta_sigma, guidance.zeta, alpha)
    scale = (delta_sigma / sigma) if delta_sigma else 1.0
    step = guidance.check_step(correction * scale, x)
    return (step / scale).to(result.x0_hat.dtype)


# Polyak iterations on the final prediction (``final_refinement``).
FINAL_ITERATIONS = 3


def is_last_step(sigma: float, delta_sigma: float | None) -> bool:
    """Whether the evaluation at ``sigma`` is the one whose step ends at σ = 0 (``delta_sigma`` from
    ``schedule_step``): the sampler's update makes its prediction the final sample."""
    return delta_sigma is not None and sigma > 0 and delta_sigma >= sigma * (1 - 1e-6)


def final_refinement(guidance: DPSGuidance, x0: torch.Tensor, iterations: int = FINAL_ITERATIONS,
                     distances: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The guided prediction of the step to σ = 0, which the sampler returns as the sample, moved up to
    ``iterations`` Polyak steps toward the noise floor in x0-space: ``x0 ← x0 − min(ζ, 1)P(x0)`` with
    ``P = (d − d*)₊/‖∇d‖² ∇d`` and ``∇d`` the gradient of ``d(x0) = ‖y − A(D(x0))‖`` through the decoder alone
    (no denoiser: at σ = 0 Tweedie's estimate is the sample), its trust region RMS(P) ≤ max(RMS(x0), 1)/ζ. A step
    is kept per sample only where it lowers d, else that sample's next try is half as long: P is a
    linearisation, and through a nonlinear decoder a full step can overshoot. Where d ≤ d* the step is zero, so the
    measurement's noise is not fitted. ``iterations + 1`` evaluations of the decoder's gradient. With
    ``distances`` (a host's list of per-sample residuals), the residual of the returned image is appended to it.

    Why: one guided evaluation linearises ``A∘D`` around a prediction that is still being formed, and its step
    removes the excess residual only to first order; the last evaluation is the last chance. It weighs most on
    schedules whose last level is far from 0 (ComfyUI's ``simple``, the levels UniPC and DPM-2 run on: σ ≈ 0.17
    against ``normal``'s 0.010). The same data-consistency step on x0_hat as DiffPIR's and MPGD's, here with the
    DPS measurement model and noise floor. Rules other than ``polyak`` (the paper's ``dps``) are left as they are;
    measured in bench/README.md, *The last step*."""
    if guidance.step_rule.name != "polyak" or iterations <= 0:
        return x0
    z = x0.detach()
    result = guidance.evaluate(z, lambda q: q)
    scale = torch.ones_like(result.distance)
    for _ in range(iterations):
        limit = rms(z).clamp_min(1.0)          # the trust region at the data's own scale (a dark image's RMS is ~0)
        step = min(guidance.zeta, 1.0) * guidance.step_gradient(result, 1.0, limit=limit)   # never past the floor
        step = guidance.check_step(step * per_sample(scale, step).to(step), z)
        if not bool(step.any()):               # every sample at its noise floor (or a zero gradient)
            break
        candidate = (z - step.to(z.dtype)).detach()
        trial = guidance.evaluate(candidate, lambda q: q)
        better = trial.distance < result.distance
        keep = per_sample(better, z)
        z = torch.where(keep, candidate, z)
        result = GuidanceResult(x0_hat=z, distance=torch.where(better, trial.distance, result.distance),
                                grad=torch.where(keep.to(trial.grad.device), trial.grad, result.grad))
        scale = torch.where(better, scale, scale / 2)
    if distances is not None:
        distances.append(result.distance.detach().cpu())
    return z


def final_stage_refinement(guidance: DPSGuidance, stages: StageClock | None, sigma: float, x: torch.Tensor,
                           prediction: torch.Tensor, iterations: int = FINAL_ITERATIONS,
                           distances: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``final_refinement`` for a sampler that returns the x of its last step rather than a prediction
    (DPM-Solver-fast, ``StageClock.final_output``): at that step's last evaluation (at ``sigma``, of the point
    ``x``, with the guided ``prediction`` D) the result is ``x_end = base + gain·D``; ``x_end`` is refined and D
    moved by ``(refined − x_end)/gain``, so the sampler lands on the refined x. ``prediction`` as it is anywhere
    else."""
    final = stages.final_output(sigma, x) if stages is not None else None
    if final is None:
        return prediction
    base, gain = final
    output = base + gain * prediction
    refined = final_refinement(guidance, output, iterations, distances)
    return prediction + (refined - output) / gain


def guided_denoised(result: GuidanceResult, guidance: DPSGuidance, sigma: float, delta_sigma: float | None,
                    x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``D' = x0_hat + correction`` for one σ-space evaluation, as ``dps.sampling.GuidedDenoiser``.

    ``result.grad`` is per sample; ``sigma`` the current level; ``delta_sigma`` the step (None: the
    posterior-score form); ``alpha`` the signal scale of ``x = α x0 + σε`` (1 − σ for flow models).
    The step the correction causes is checked for divergence.
    """
    return result.x0_hat + guided_correction(result, guidance, sigma, delta_sigma, x, alpha)


def eps_correction(guidance: DPSGuidance, result: GuidanceResult, x: torch.Tensor, alpha_cumprod: float,
                   alpha_cumprod_next: float | None) -> torch.Tensor:
    """The change δ of ε̂ that applies the DPS step in timestep samplers (DDIM family), ``ε' = ε + δ``
    (``StepRule.eps_correction``): "dps"/"dps_paper" move one deterministic DDIM step by exactly −ζ∇d when the
    next ᾱ is known, "polyak" takes its rate form on x/√ᾱ, "schedule" (and the first step) the score form.
    The trust region is ``step_limit``'s on x/√ᾱ, where DDIM is Euler in σ = √((1−ᾱ)/ᾱ): the move
    ``Δσ·δ = (Δσ/σ)·step/√ᾱ`` of one deterministic step is bounded as a σ-space sampler's. A rule that replaces the
    prediction (``"proximal"``) gives the δ with which the sampler's x0 = (x_t − √(1−ᾱ)ε')/√ᾱ is x0'."""
    sigma = vp_sigma(alpha_cumprod)
    replaced = guidance.step_rule.prediction(guidance, result, sigma, math.sqrt(alpha_cumprod))  # x/√ᾱ = x0 + σε
    if replaced is not None:    # ε' = (x_t − √ᾱ x0')/√(1−ᾱ): the sampler's prediction becomes x0'
        step = guidance.check_step(replaced - result.x0_hat, x)
        return -math.sqrt(alpha_cumprod / (1.0 - alpha_cumprod)) * step
    delta = None if alpha_cumprod_next is None else sigma - vp_sigma(alpha_cumprod_next)
    limit = step_limit(x, result.x0_hat, sigma, delta, scale=math.sqrt(alpha_cumprod))
    grad = guidance.step_gradient(result, vp_x0_jacobian(alpha_cumprod, guidance.sigma_data), limit=limit)
    step = guidance.check_step(guidance.zeta * grad, x)
    return guidance.step_rule.eps_correction(step, alpha_cumprod, alpha_cumprod_next)
