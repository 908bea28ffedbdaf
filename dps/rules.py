"""Step rules: how the DPS gradient becomes a step of a sampler, one class per rule, each owning every form it has.

A rule turns the per-sample distance ``d = ‖residual(y, A(D(x0_hat)))‖`` and its gradient ``g`` (see
``dps.guidance``) into the sampler's update, in each sampler's own terms:

* ``objective`` / ``scale_gradient``: what is differentiated (``d``, or ``d²`` then divided by ``d``);
* ``direction``: the x-space direction the sampler steps along (``DPSGuidance.step_gradient``);
* ``denoised_correction``: the change of the denoised prediction ``D(x, σ)`` in σ-space samplers (k-diffusion,
  ComfyUI, the WebUI's k-samplers), given the checked direction and the step ``Δσ``;
* ``eps_correction``: the change of ε̂ in timestep samplers (the WebUI's DDIM/PLMS/UniPC), given the checked step;
* ``ddpm_step_size``: the factor of the direction in a DDPM/DDIM x-space update ``x_{t-1} = x'_{t-1} − size·dir``;
* ``prediction`` (with ``differentiates = False``): a rule that replaces x0_hat outright instead (``"proximal"``);
  every sampler form then takes its step from the new prediction.

The base class holds the official DPS code's forms (a constant step, Euler-calibrated in σ-space); a rule
overrides what differs. A new rule is one class with ``@register``; its name then appears in ``RULES`` and every
host's rule list. The formulas and their sources are in ``dps.guidance``'s module docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .autograd_safe import autograd_safe
from .schedule import vp_sigma

if TYPE_CHECKING:   # annotations only: guidance imports this module
    from .guidance import DPSGuidance, GuidanceResult

REGISTRY: dict[str, "StepRule"] = {}


def register(cls: type["StepRule"]) -> type["StepRule"]:
    """Class decorator: add one instance of the rule ``cls`` to ``REGISTRY`` under ``cls.name`` (a name may be
    registered once)."""
    if not cls.name or cls.name in REGISTRY:
        raise ValueError(f"a step rule needs a new name; {cls.name!r} is empty or already registered")
    REGISTRY[cls.name] = cls()
    return cls


def get_rule(name: str) -> "StepRule":
    """The registered rule ``name``; ``ValueError`` listing the choices otherwise."""
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"rule must be one of {tuple(REGISTRY)}, got {name!r}") from None


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector (B,) shaped to broadcast against ``like`` (B, ...)."""
    return v.view(-1, *([1] * (like.ndim - 1)))


class StepRule:
    """One step rule in every sampler form. The defaults are the official DPS code's step (rule ``"dps"``).

    ``scales_with_steps``: the rule's ζ is a step per sampler step, so the total guidance grows with the step
    count and a ζ tuned at one count is rescaled by ``reference_steps / steps`` at another (``dps.app.tuned``).
    """

    name: ClassVar[str] = ""
    scales_with_steps: ClassVar[bool] = False
    differentiates: ClassVar[bool] = True

    def prediction(self, guidance: "DPSGuidance", result: "GuidanceResult", sigma: float,
                   scale: float = 1.0) -> torch.Tensor | None:
        """The guided prediction itself, for a rule that replaces x0_hat outright rather than stepping along a
        gradient (``sigma``: the level of ``x/scale = x0 + σε``, ``scale`` the sampler's signal scale: 1 in
        σ-space, α for flow models, √ᾱ for a VP ``x_t``); ``None`` for the gradient rules."""
        return None

    def objective(self, distance: torch.Tensor) -> torch.Tensor:
        """What is differentiated, per sample: ``d``."""
        return distance

    def scale_gradient(self, grad: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """The gradient of ``objective`` times the rule's per-sample factor (none here)."""
        return grad

    def direction(self, guidance: "DPSGuidance", result: "GuidanceResult", jacobian: float = 1.0,
                  limit: torch.Tensor | None = None) -> torch.Tensor:
        """The x-space direction: ``g``, mapped by ``jacobian`` (∂x0_hat/∂x) when ``g`` is an x0-space gradient."""
        return result.grad * jacobian if guidance.mode == "x0_only" else result.grad

    def denoised_correction(self, grad: torch.Tensor, sigma: float, delta_sigma: float | None, zeta: float,
                            alpha: float = 1.0) -> torch.Tensor:
        """Euler-calibrated: ``D' = D − ζ g σ/Δσ``, so one Euler step moves x by exactly ``−ζ g``; the
        posterior-score form when the step is unknown (``delta_sigma`` None or ≤ 0)."""
        if delta_sigma is None or delta_sigma <= 0:
            return score_correction(grad, sigma, zeta, alpha)
        return -zeta * (sigma / delta_sigma) * grad

    def eps_correction(self, step: torch.Tensor, alpha_cumprod: float,
                       alpha_cumprod_next: float | None) -> torch.Tensor:
        """``δ`` of ``ε' = ε + δ`` for the checked x-step ``step = ζ·direction``: DDIM is Euler in
        σ = √((1−ᾱ)/ᾱ) on x/√ᾱ, so ``δ = step / (Δσ √ᾱ_next)`` moves one deterministic DDIM step by exactly
        ``−step``; the score form ``√(1−ᾱ)·step`` when the next ᾱ is unknown (the first step)."""
        if alpha_cumprod_next is None:
            return math.sqrt(1.0 - alpha_cumprod) * step
        sigma, sigma_next = vp_sigma(alpha_cumprod), vp_sigma(alpha_cumprod_next)
        if sigma <= sigma_next:
            return math.sqrt(1.0 - alpha_cumprod) * step
        return step / ((sigma - sigma_next) * math.sqrt(alpha_cumprod_next))

    def ddpm_step_size(self, zeta: float, beta: float, alpha_cumprod: float | None = None) -> float:
        """The constant step ζ."""
        return zeta


def score_correction(grad: torch.Tensor, sigma: float, zeta: float, alpha: float = 1.0) -> torch.Tensor:
    """The posterior-score form ``D' = D + (σ²/α) ∇log p(y|x)`` with ``∇log p(y|x) ≈ −ζ g`` (Tweedie's formula
    applied to the posterior; α = 1 − σ for flow models, 1 otherwise)."""
    return -zeta * sigma**2 / alpha * grad


@register
class DPS(StepRule):
    """``x_{t-1} = x'_{t-1} − ζ ∇_{x_t} d``: the official code's rule (``condition_methods.py``), per sample."""

    name = "dps"
    scales_with_steps = True


@register
class DPSPaper(StepRule):
    """``x_{t-1} = x'_{t-1} − ζ/d · ∇_{x_t} d²``: the paper's Algorithm 1 with ``ζ_i = ζ'/d``; ``"dps"`` with
    ζ = 2ζ'."""

    name = "dps_paper"
    scales_with_steps = True

    def objective(self, distance: torch.Tensor) -> torch.Tensor:
        return distance.square()

    def scale_gradient(self, grad: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        return grad / per_sample(distance.clamp_min(torch.finfo(distance.dtype).tiny), grad)


@register
class Schedule(StepRule):
    """The guidance enters the score, ``∇log p(y|x_t) ≈ −ζ g``, scaled by the sampler's own score coefficient."""

    name = "schedule"

    def denoised_correction(self, grad: torch.Tensor, sigma: float, delta_sigma: float | None, zeta: float,
                            alpha: float = 1.0) -> torch.Tensor:
        return score_correction(grad, sigma, zeta, alpha)

    def eps_correction(self, step: torch.Tensor, alpha_cumprod: float,
                       alpha_cumprod_next: float | None) -> torch.Tensor:
        """ε enters as −√(1−ᾱ)·score (Dhariwal & Nichol 2021, eq. 14): ``δ = √(1−ᾱ)·step``."""
        return math.sqrt(1.0 - alpha_cumprod) * step

    def ddpm_step_size(self, zeta: float, beta: float, alpha_cumprod: float | None = None) -> float:
        """``ζ β_t/√(1 − β_t)``, the score's coefficient in the DDPM posterior mean (Ho et al. 2020, eq. 11)."""
        return zeta * beta / math.sqrt(1.0 - beta)


@register
class Polyak(StepRule):
    """Polyak's step to the noise floor ``d* = E‖n‖`` in a rate form, with a trust region (``dps.guidance``)."""

    name = "polyak"

    def direction(self, guidance: "DPSGuidance", result: "GuidanceResult", jacobian: float = 1.0,
                  limit: torch.Tensor | None = None) -> torch.Tensor:
        """``P = (d − d*)₊/‖g‖² · g``, formed as ``‖P‖ · g/‖g‖`` in float64 (a tiny ‖g‖ gives a long finite step,
        a zero or non-finite ‖g‖ a zero step), shrunk per sample so that RMS(ζP) ≤ ``limit``. Not mapped by
        ``jacobian`` in mode "x0_only": P is then the x0-space step (MPGD's)."""
        grad = result.grad
        floor = guidance.noise.expected_distance(autograd_safe(guidance.y)).to(result.distance)
        excess = (result.distance - floor).clamp_min(0).double()
        norm = grad.double().flatten(1).square().sum(1).sqrt()
        usable = (norm > 0) & torch.isfinite(norm)
        safe_norm = torch.where(usable, norm, torch.ones_like(norm))
        length = torch.where(usable, excess / safe_norm, torch.zeros_like(norm))   # ‖P‖ = (d − d*)₊ / ‖g‖
        if limit is not None and guidance.zeta > 0:
            bound = limit.double().to(length.device) / guidance.zeta * grad[0].numel() ** 0.5   # RMS(ζP) <= limit
            length = torch.minimum(length, bound)
        direction = grad.double() / per_sample(safe_norm, grad)
        step = direction * per_sample(length, grad)
        return step.to(grad.dtype)

    def denoised_correction(self, grad: torch.Tensor, sigma: float, delta_sigma: float | None, zeta: float,
                            alpha: float = 1.0) -> torch.Tensor:
        """The rate form ``D' = D − ζP`` whatever the step, with ζ capped at ``σ/Δσ`` when the step is known: an
        Euler step removes the fraction ``ζΔσ/σ`` of the excess residual, and removing more than all of it
        (ζ > 1 on a last step to σ = 0, where Δσ/σ = 1) overshoots past the noise floor. At ζ ≤ 1 the cap never
        acts (Δσ ≤ σ). Measured with ζ = 3 on the pixel prior, 30 Euler ancestral steps: final residual over the
        noise floor 0.99-1.06 instead of 0.99-2.15 (``bench/few_steps.py``, ``bench/README.md``)."""
        if delta_sigma:
            zeta = min(zeta, sigma / abs(delta_sigma))
        return -zeta * grad

    def eps_correction(self, step: torch.Tensor, alpha_cumprod: float,
                       alpha_cumprod_next: float | None) -> torch.Tensor:
        """The rate form on x/√ᾱ: ``δ = ζP/√(1−ᾱ)``."""
        return step / math.sqrt(1.0 - alpha_cumprod)

    def ddpm_step_size(self, zeta: float, beta: float, alpha_cumprod: float | None = None) -> float:
        """``min(ζ (1 − σ_{t−1}/σ_t), 1)`` with σ² = (1 − ᾱ)/ᾱ and ᾱ_{t−1} = ᾱ_t/(1 − β_t) (the cap: as in
        ``denoised_correction``)."""
        if alpha_cumprod is None:
            raise ValueError("the 'polyak' rule needs alpha_cumprod for its DDPM step size")
        ac_prev = min(alpha_cumprod / (1.0 - beta), 1.0)
        return min(zeta * (1.0 - vp_sigma(ac_prev) / vp_sigma(alpha_cumprod)), 1.0)   # never past the whole excess


@register
class Proximal(StepRule):
    """The data-consistency step on x0_hat (``dps.proximal``, DiffPIR's data subproblem solved by Gauss-Newton
    conjugate gradients): the prediction becomes ``x0' = argmin ½‖r(x)‖² + ½ρ‖x − x0_hat‖²`` with
    ``ρ = (λ/ζ) s²/σ²``, λ = ``dps.proximal.LAMBDA``, so ζ = 1 is the measured default and a larger ζ weighs the
    measurement more. Made for samplers that re-noise the prediction with fresh noise at every step (``lcm``, and
    ``dps.sampling.proximal_sample``): a deterministic sampler re-uses the noise estimate ``(x − x0')/σ``, which
    then carries the correction back (measured in bench/README.md). In mode "full" x0_hat is first moved by the
    data step's first iterate carried back through the denoiser's Jacobian (``dps.proximal``, (2): one backward
    pass through the model, as the gradient rules take); in mode "x0_only" the model is not differentiated."""

    name = "proximal"
    differentiates = False      # no gradient step of x_t: the prediction is replaced

    def prediction(self, guidance: "DPSGuidance", result: "GuidanceResult", sigma: float,
                   scale: float = 1.0) -> torch.Tensor | None:
        from .proximal import LAMBDA, proximal_prediction  # dps.proximal imports the guidance, which imports this
        return proximal_prediction(guidance, result, sigma, scale, lam=LAMBDA / guidance.zeta)

    def objective(self, distance: torch.Tensor) -> torch.Tensor:
        """``½d² = ½‖r‖²``, the data term of ``dps.proximal``'s (1)."""
        return 0.5 * distance.square()


RULES: tuple[str, ...] = tuple(REGISTRY)


def denoised_correction(grad: torch.Tensor, sigma: float, delta_sigma: float | None, rule: str,
                        zeta: float, alpha: float = 1.0) -> torch.Tensor:
    """The change of the denoised prediction ``D(x, σ)`` that applies guidance in σ-space samplers, for the rule
    named ``rule`` (``StepRule.denoised_correction``).

    For ``x = x0 + σε`` and an Euler step ``x_next = x + (σ_next − σ)(x − D)/σ``:

    * posterior-score form (rule "schedule"): ``D' = D + σ² ∇log p(y|x)`` with ``∇log p(y|x) ≈ −ζ ∇d``
      (Tweedie's formula applied to the posterior; the k-diffusion CLIP-guidance template).
      Used too when the step is unknown (``delta_sigma`` is None).
    * Euler-calibrated form (rules "dps", "dps_paper"): ``D' = D − ζ ∇d · σ / Δσ`` with ``Δσ = σ − σ_next``,
      so one Euler step moves x by exactly ``−ζ ∇d``, the x-space DPS step.
    * rate form (rule "polyak", ``grad`` = its Polyak direction P): ``D' = D − ζP`` whatever the step.

    Flow models (``x = α x0 + σε``, α = 1 − σ, with the same Euler step on d = (x − D)/σ as ComfyUI uses):
    Tweedie gives ``E[x0|x] = (x + σ²∇log p(x))/α``, so the posterior-score form becomes
    ``D' = D + (σ²/α)∇log p(y|x)``; the Euler-calibrated form is unchanged.
    """
    return get_rule(rule).denoised_correction(grad, sigma, delta_sigma, zeta, alpha)


def ddpm_step_size(rule: str, zeta: float, beta: float, alpha_cumprod: float | None = None) -> float:
    """The factor of the direction in a DDPM/DDIM x-space update, for the rule named ``rule``
    (``StepRule.ddpm_step_size``)."""
    return get_rule(rule).ddpm_step_size(zeta, beta, alpha_cumprod)


@dataclass(frozen=True)
class Default:
    """A default rule and strength, and the measurement it rests on."""

    rule: str
    zeta: float
    measured: str


# One default story: one (rule, ζ) per sampler family, which every host and the library take from here. The two
# families' ζ differ because a σ-space Euler step and a DDPM step apply the same rule over different step sizes
# (docs/maths.md, *Step rules*). The demo application tunes (rule, ζ) per task on top of this (``dps.app.tuned``).
DEFAULTS = {
    "sigma": Default("polyak", 1.0, "σ-space samplers (the ComfyUI node; the WebUI's k-diffusion and DDIM/PLMS "
                     "paths): bench/host_defaults.py, SD1.x-latent prior and TAESD, 20 steps, Euler: one ζ beats "
                     "the simple baselines on super-resolution, inpainting and deblurring"),
    "ddpm": Default("schedule", 2.0, "DDPM/DDIM (DPSGuidance's own default): bench/gmm.py, the best ζ stays "
                    "within 1-3 from 100 to 1000 steps and ζ = 2 is within 7 % of it at both"),
}
