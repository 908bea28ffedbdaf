"""The DPS guidance step (Chung et al., ICLR 2023, arXiv 2209.14687): the gradient of the measurement
residual through Tweedie's estimate, and the rules that turn it into a step of any sampler.

Notation: ``x_t`` the sampler's state, ``x0_hat = E[x_0 | x_t]`` (Tweedie), ``D`` an optional decoder
(latent models), ``A`` the operator, ``y`` the measurement and

    d(x_t) = ‖ residual(y, A(D(x0_hat(x_t)))) ‖₂        (per sample; see ``dps.noise``)

Step rules (``RULES``; one class each in ``dps.rules``, which owns every form of a rule):

* ``"dps"``: ``x_{t-1} = x'_{t-1} − ζ ∇_{x_t} d``, the official code's rule (``condition_methods.py``),
  computed per sample instead of over the whole batch.
* ``"dps_paper"``: ``x_{t-1} = x'_{t-1} − ζ/d · ∇_{x_t} d²``, the paper's Algorithm 1 with its step
  ``ζ_i = ζ'/‖y − A(x0_hat)‖``. Since ``∇d² = 2d∇d`` it equals ``"dps"`` with ``ζ = 2ζ'``.
* ``"schedule"``: the guidance enters the score, ``∇log p(y | x_t) ≈ −ζ ∇d``, and is scaled by the
  sampler's own score coefficient: ``β_t/√α_t`` in DDPM (large early, small late, and growing
  automatically when steps are respaced), ``σ²`` in the denoiser (σ-space) form. deepinv's DPS does the
  same through its SDE solver.
* ``"polyak"``: a relaxation of the residual toward the noise floor at rate ζ per unit of log σ. With ``g`` the
  x-space gradient of ``d`` and ``d* = E‖n‖`` (``NoiseModel.expected_distance``), the direction is Polyak's
  step for reaching a known target value (Polyak 1987, *Introduction to Optimization*, §5.3),
  ``P = (d − d*)₊ / ‖g‖² · g``; to first order, moving x by ``−εP`` removes the fraction ε of the excess
  residual ``d − d*``, whatever the scale of ``A``, of the decoder's Jacobian or of the image. σ-space
  samplers get ``D' = D − ζP`` (``denoised_correction``): a correction that does not depend on the step,
  so an Euler step from σ to σ − Δσ removes ζΔσ/σ of the excess, multistep solvers see a smooth guided
  denoiser, and ζ does not have to change with the step count. DDPM/DDIM take the same x-step,
  ``ζ (1 − σ_{t−1}/σ_t) P`` with ``σ_t = √((1 − ᾱ_t)/ᾱ_t)``. Measured: within a sampler family one ζ serves
  every task (σ-space Euler samplers at 20 steps: ζ = 1 on super-resolution, inpainting and deblurring,
  ``bench/host_defaults.py``; DDPM at 200 steps on the pixel prior: ζ = 10 best on all six demo tasks,
  ``bench/tune_demo.py``), but the two families' ζ differ tenfold.

* ``"proximal"``: no gradient step of x_t; the prediction is replaced by the solution of a small data-consistency
  problem around it (``dps.proximal``: DiffPIR's data subproblem with the DPS residual and noise floor, solved by
  Gauss-Newton conjugate gradients), in mode "full" after moving it by the gradient of ½d² through the denoiser
  (``dps.proximal``, (2)); for samplers that re-noise the prediction with fresh noise every step.

Gradient modes (``MODES``): ``"full"`` backpropagates through the denoiser (and decoder); ``"x0_only"``
differentiates with respect to ``x0_hat`` alone (MPGD, He et al. 2024), several times cheaper, and
maps the gradient back with the denoiser Jacobian replaced by that of a Gaussian prior of standard
deviation ``sigma_data`` (0.5 for images in [-1, 1], EDM's σ_data): ``∂x0_hat/∂x ≈ σ_d²/(σ_d² + σ²)·I``
in σ-space, ``√ᾱ σ_d²/(ᾱ σ_d² + 1 − ᾱ)·I`` in VP form (``x0_jacobian``). It tends to the identity at low
noise and damps the step at high noise, where x0_hat barely depends on x_t.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch

from .autograd_safe import autograd_safe
from .noise import NoiseModel
from .operators import Operator
from .recompute import BlockRecompute
from .rules import DEFAULTS, RULES, StepRule, ddpm_step_size, denoised_correction, get_rule
from .validate import check_callable, check_number, check_tensor
from .vae_gradient import DecoderGradient

__all__ = ["DPSGuidance", "GuidanceResult", "GuidanceDivergedError", "RULES", "MODES", "ON_NONFINITE",
           "ddpm_step_size", "denoised_correction", "x0_jacobian", "vp_x0_jacobian", "rms"]

MODES = ("full", "x0_only")
ON_NONFINITE = ("raise", "skip")
_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)   # torch >= 2.5 / older

Decoder = Callable[[torch.Tensor], torch.Tensor]


class GuidanceDivergedError(RuntimeError):
    """Raised when the guidance gradient is non-finite or explodes; the message names the fix."""


@dataclass(frozen=True)
class GuidanceResult:
    """One evaluation of the data term: ``x0_hat`` (detached), per-sample ``distance`` (B,), and ``grad``,
    the gradient of the rule's objective w.r.t. ``x_t`` (mode "full") or ``x0_hat`` (mode "x0_only"),
    already multiplied by the rule's per-sample factor (``1/d`` for "dps_paper"), so that every rule's
    step is ``−size · grad``. For a rule that replaces the prediction (``"proximal"``) in mode "full", ``grad`` is
    ``∇_{x_t} ½d²`` and ``x0_grad`` its x0-space part ``∇_{x0_hat} ½d²`` (``dps.proximal``, (2)); else None."""

    x0_hat: torch.Tensor
    distance: torch.Tensor
    grad: torch.Tensor
    skipped: bool = False
    x0_grad: torch.Tensor | None = None


@dataclass
class DPSGuidance:
    """Everything guidance needs: the measurement ``y``, the operator ``A``, the noise model and the
    step settings. Host adapters build one and call ``evaluate`` from their hook.

    Args:
        operator: the forward model ``A``; it receives images in [-1, 1].
        noise: the noise model (``dps.noise``); supplies the residual.
        y: the measurement, shaped like ``A(x)`` (batch 1 is broadcast over the sampler's batch).
        zeta: the step size ζ (its meaning depends on ``rule``; see the module docstring).
        rule: one of ``RULES``. The default, "schedule" with ζ = 2 (``dps.rules.DEFAULTS["ddpm"]``), is the
            setting that needed the least tuning on the Gaussian-mixture benchmark: its best ζ stayed at 1-3 from
            100 to 1000 steps while the constant rule's moved tenfold (``bench/gmm.py``, results in
            ``bench/README.md``). σ-space hosts start from ``DEFAULTS["sigma"]``.
        mode: one of ``MODES``.
        decoder: maps the model's x0 (a latent) to an image in [-1, 1]; ``None`` for pixel models.
        start, end: guide only while the sampling progress (0 at the first step, 1 at the last) lies in
            [start, end], as ControlNet's start/end percent.
        on_nonfinite: "raise" (``GuidanceDivergedError``) or "skip" the step with a warning.
        explode_ratio: a step whose RMS exceeds ``explode_ratio · max(1, RMS(x_t))`` counts as diverged.
        sigma_data: prior standard deviation used by mode "x0_only" (``x0_jacobian``).
        inplace_safe: differentiate models that add into saved activations in place (ComfyUI's UNet adds
            ControlNet residuals with ``h += ctrl``); host adapters set it. It costs 15-25 % per guided step on
            the small embedded pixel prior on CPU, hence off for the reference samplers.
        decoder_gradient: a memory-bounded way through the decoder (``dps.vae_gradient``); replaces
            ``decoder``. The gradient is then taken in two parts by the chain rule: the latent gradient
            ``J_Dᵀ ∂d/∂image`` by the planned mode, then (mode "full") that pulled back through the denoiser,
            so the decoder's graph never grows the denoiser's (the denoiser's graph is held meanwhile).
        denoiser_recompute: in mode "full", the denoiser blocks whose activations are recomputed in the backward
            pass instead of kept (``dps.recompute``; exact); host adapters set it on the host's denoiser network.
        fallback_on_oom: in mode "full", an out-of-memory error (``torch.OutOfMemoryError``, a GPU's) while
            differentiating through the denoiser frees the graph and redoes the evaluation in mode "x0_only",
            which keeps only the decoder's (memory-bounded) graph; the guidance then stays in "x0_only" and
            ``notes`` says why. Host adapters set it (a ComfyUI user's SDXL at 1024 px on a 12-16 GB card runs
            guided instead of failing, as ComfyUI's own VAE decode retries tiled); off, the error is raised.
    """

    operator: Operator
    noise: NoiseModel
    y: torch.Tensor
    zeta: float = DEFAULTS["ddpm"].zeta
    rule: str = DEFAULTS["ddpm"].rule
    mode: str = "full"
    decoder: Decoder | None = None
    start: float = 0.0
    end: float = 1.0
    on_nonfinite: str = "raise"
    explode_ratio: float = 100.0
    sigma_data: float = 0.5
    inplace_safe: bool = False
    decoder_gradient: DecoderGradient | None = None
    denoiser_recompute: BlockRecompute | None = None
    fallback_on_oom: bool = False
    notes: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        check_callable("operator", self.operator, "a forward model A, e.g. dps.operators.SuperResolution(4)")
        if not callable(getattr(self.noise, "distance", None)):
            raise TypeError(f"noise must be a dps.noise model such as dps.Gaussian(0.05), got "
                            f"{type(self.noise).__name__}")
        check_tensor("y", self.y, floating=True, fix="the measurement, shaped like A(x), e.g. y = A(x)[:1]")
        check_number("zeta", self.zeta, minimum=0, fix="the step size; 0 turns guidance off")
        check_number("start", self.start, minimum=0, maximum=1)
        check_number("end", self.end, minimum=0, maximum=1)
        check_number("explode_ratio", self.explode_ratio, above=0, finite=False)
        check_number("sigma_data", self.sigma_data, above=0, fix="0.5 for images in [-1, 1]")
        if self.decoder is not None:
            check_callable("decoder", self.decoder, "a function mapping latents to images in [-1, 1], or None")
        get_rule(self.rule)   # ValueError listing the registered rules
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got {self.on_nonfinite!r}")
        if not (math.isfinite(self.zeta) and self.zeta >= 0):
            raise ValueError(f"zeta must be a finite number >= 0, got {self.zeta!r}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1, got start={self.start}, end={self.end}")
        if not torch.isfinite(self.y).all():
            raise ValueError("the measurement y contains NaN or infinite values; check the input image")

    @property
    def step_rule(self) -> StepRule:
        """The rule's object (``dps.rules``), which owns its step in every sampler form."""
        return get_rule(self.rule)

    def active(self, progress: float) -> bool:
        """Whether to guide at this sampling progress (0 = first step, 1 = last)."""
        return self.zeta > 0 and self.start <= progress <= self.end

    def evaluate(self, x_t: torch.Tensor, x0_fn: Callable[[torch.Tensor], torch.Tensor]) -> GuidanceResult:
        """Compute ``x0_hat = x0_fn(x_t)``, the per-sample distance and the rule's gradient.

        Works when called under ``torch.no_grad()`` or ``torch.inference_mode()`` (hosts sample so):
        grad is re-enabled locally on a copy of ``x_t``, and the result is detached. With ``inplace_safe``
        the model is differentiated under ``allow_mutation_on_saved_tensors``, which keeps a copy of a saved
        activation when the model mutates it instead of failing the backward pass.
        """
        if self.mode == "full" and self.fallback_on_oom:
            try:
                return self._evaluate(x_t, x0_fn)
            except _OUT_OF_MEMORY:
                pass   # the failed graph is released when the handler ends, before the retry below
            if x_t.is_cuda:
                torch.cuda.empty_cache()
            self.mode = "x0_only"
            note = ("out of memory differentiating through the denoiser (gradient 'full'); guiding with gradient "
                    "'x0_only' from here on (through the decoder only). Set gradient to x0_only, use the fast "
                    "decoder or a smaller image to avoid the retry")
            self.notes.append(note)
            warnings.warn(f"DPS: {note}", RuntimeWarning, stacklevel=2)
        return self._evaluate(x_t, x0_fn)

    def _evaluate(self, x_t: torch.Tensor, x0_fn: Callable[[torch.Tensor], torch.Tensor]) -> GuidanceResult:
        if not self.step_rule.differentiates and self.mode == "x0_only":   # "proximal" alone: no gradient at all
            with torch.no_grad():
                x0_hat = x0_fn(x_t).detach()
                distance = self.distance(x0_hat).detach()
            return self._checked(GuidanceResult(x0_hat, distance, torch.zeros_like(x0_hat)), x_t)
        mutation = torch.autograd.graph.allow_mutation_on_saved_tensors() if self.inplace_safe else nullcontext()
        with torch.inference_mode(False), torch.enable_grad(), mutation:
            x = autograd_safe(x_t).detach().requires_grad_(self.mode == "full")
            if self.mode == "full":
                recompute = self.denoiser_recompute
                with recompute.active(x.device) if recompute is not None else nullcontext():
                    x0_hat = x0_fn(x)
                leaf = x
            else:
                with torch.no_grad():
                    x0_hat = x0_fn(x)
                x0_hat = autograd_safe(x0_hat).detach().requires_grad_(True)
                leaf = x0_hat
            if not self.step_rule.differentiates:       # "proximal", mode full: ½d² through x0_hat, then x_t
                distance, grad, x0_grad = self._split_gradient(x0_hat, leaf)
                result = GuidanceResult(x0_hat.detach(), distance.detach(), grad.detach(), x0_grad=x0_grad.detach())
                return self._checked(result, x_t)
            if self.decoder_gradient is None:
                distance = self.distance(x0_hat)
                (grad,) = torch.autograd.grad(self.step_rule.objective(distance).sum(), leaf)
            else:
                distance, grad, _ = self._split_gradient(x0_hat, leaf)
        grad = grad.detach()
        distance = distance.detach()
        grad = self.step_rule.scale_gradient(grad, distance)
        return self._checked(GuidanceResult(x0_hat.detach(), distance, grad), x_t)

    def step_gradient(self, result: GuidanceResult, jacobian: float = 1.0,
                      limit: torch.Tensor | None = None) -> torch.Tensor:
        """The x-space direction the rule steps along: the sampler's update is ``−size · step_gradient``.

        ``jacobian`` maps an x0-space gradient (mode "x0_only") to x-space (``x0_jacobian``); it is ignored
        in mode "full". For rule "polyak" the direction carries the per-sample Polyak factor
        ``(d − d*)₊ / ‖g‖²`` (see the module docstring). In mode "x0_only" it is computed on the x0-space
        gradient and not mapped: P is then the step of x0_hat that removes the excess residual (MPGD's
        update of x0_hat, He et al. 2024). Mapping it through the Gaussian Jacobian J would divide it by J,
        i.e. multiply it by (σ² + σ_d²)/σ_d² (~800 at σ = 14), and the real denoiser's response to such a
        jump of x is far from J's.

        Trust region ("polyak" only): with ``limit`` (per sample, e.g. the RMS of the sampler's x) the
        direction is shrunk per sample so that the RMS of ``ζP`` is at most ``limit``: guidance never moves
        the prediction by more than the size of the sample itself. Where the denoiser hardly depends on x
        (small ‖g‖) Polyak's first-order step would otherwise be a jump the network's response does not follow.
        P is formed as ``‖P‖ · g/‖g‖`` in float64, so a tiny ‖g‖ gives a long but finite step (cut by the trust
        region) and a zero or non-finite ‖g‖ a zero step, never NaN or inf.
        """
        return self.step_rule.direction(self, result, jacobian, limit)

    def _split_gradient(self, x0_hat: torch.Tensor, leaf: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Distance, gradient with respect to ``leaf`` and gradient with respect to ``x0_hat``, by the chain rule in
        two parts: the latter first (through ``decoder_gradient`` when there is one; see its field), then pulled
        back through the denoiser's graph to ``leaf``."""
        distance, g_latent = self._x0_gradient(x0_hat, self.step_rule.objective)
        if leaf is x0_hat:
            return distance, g_latent, g_latent
        (grad,) = torch.autograd.grad(x0_hat, leaf, grad_outputs=g_latent.to(x0_hat.dtype))
        return distance, grad, g_latent

    def _x0_gradient(self, x0_hat: torch.Tensor, objective: Callable[[torch.Tensor], torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-sample distance and the gradient of ``objective(distance).sum()`` with respect to ``x0_hat``
        alone (its graph to x_t is not used), through ``decoder_gradient`` when there is one."""
        if self.decoder_gradient is not None:
            def image_objective(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                distance = self.image_distance(image)
                return distance, objective(distance).sum()

            return self.decoder_gradient.gradient(x0_hat.detach(), image_objective)
        z = x0_hat.detach().requires_grad_(True)
        distance = self.distance(z)
        (grad,) = torch.autograd.grad(objective(distance).sum(), z)
        return distance.detach(), grad

    def distance(self, x0_hat: torch.Tensor) -> torch.Tensor:
        """Per-sample ``d = ‖residual(y, A(D(x0_hat)))‖`` (differentiable), computed in float32 at least."""
        if self.decoder_gradient is not None:
            return self.image_distance(self.decoder_gradient.decode(x0_hat))
        return self.image_distance(self.decoder(x0_hat) if self.decoder is not None else x0_hat)

    def image_distance(self, image: torch.Tensor) -> torch.Tensor:
        """Per-sample ``d = ‖residual(y, A(image))‖`` for a decoded image in [-1, 1], in float32 at least."""
        return self.noise.distance(*self._measured(image))

    def image_residual(self, image: torch.Tensor) -> torch.Tensor:
        """The noise model's residual ``residual(y, A(image))`` itself, in float32 at least (``dps.proximal``)."""
        return self.noise.residual(*self._measured(image))

    def _measured(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, A(image))`` in the image's dtype (float32 for half precision), ``y`` broadcast to the batch."""
        if image.dtype in (torch.float16, torch.bfloat16):
            image = image.float()
        y = autograd_safe(self.y).to(device=image.device, dtype=image.dtype)
        ax = self.operator(image)
        if y.shape[0] == 1 and ax.shape[0] > 1:
            y = y.expand(ax.shape[0], *y.shape[1:])
        return y, ax

    def _checked(self, result: GuidanceResult, x_t: torch.Tensor) -> GuidanceResult:
        finite = bool(torch.isfinite(result.grad).all()) and bool(torch.isfinite(result.distance).all())
        if finite:
            return result
        message = ("DPS guidance produced a non-finite gradient (the measurement residual or its gradient is "
                   "NaN/inf). Lower zeta, start guidance later (start > 0), use mode='x0_only', or compute "
                   "the model in float32.")
        if self.on_nonfinite == "raise":
            raise GuidanceDivergedError(message)
        warnings.warn(message + " This step is left unguided.", RuntimeWarning, stacklevel=3)
        zero = torch.zeros_like(result.grad)
        return GuidanceResult(torch.nan_to_num(result.x0_hat), torch.nan_to_num(result.distance), zero, skipped=True)

    def check_step(self, step: torch.Tensor, x_t: torch.Tensor) -> torch.Tensor:
        """Return ``step`` unless its RMS explodes relative to ``x_t``; then raise or return zeros."""
        rms_step = step.float().flatten(1).square().mean(1).sqrt()
        rms_x = x_t.float().flatten(1).square().mean(1).sqrt().clamp_min(1.0)
        if bool((rms_step <= self.explode_ratio * rms_x).all()):
            return step
        message = (f"DPS guidance diverged: a guidance step is {float((rms_step / rms_x).max()):.3g} times the size "
                   f"of the sample (limit {self.explode_ratio:g}). Lower zeta (now {self.zeta:g}), or use the "
                   "'schedule' rule, which scales the step with the noise level.")
        if self.on_nonfinite == "raise":
            raise GuidanceDivergedError(message)
        warnings.warn(message + " This step is left unguided.", RuntimeWarning, stacklevel=3)
        return torch.zeros_like(step)


def x0_jacobian(sigma: float, sigma_data: float = 0.5, alpha: float = 1.0) -> float:
    """∂x0_hat/∂x for ``x = α x0 + σε`` under a Gaussian prior N(0, σ_d²): α σ_d²/(α² σ_d² + σ²)
    (mode "x0_only"); α = 1 for k-diffusion's x = x0 + σε, α = 1 − σ for rectified-flow models (SD3, FLUX)."""
    return alpha * sigma_data**2 / (alpha**2 * sigma_data**2 + sigma**2)


def vp_x0_jacobian(alpha_cumprod: float, sigma_data: float = 0.5) -> float:
    """∂x0_hat/∂x_t for ``x_t = √ᾱ x_0 + √(1−ᾱ) ε`` under a Gaussian prior N(0, σ_d²):
    √ᾱ σ_d²/(ᾱ σ_d² + 1 − ᾱ), the VP form of ``x0_jacobian`` (→ 1/√ᾱ at low noise)."""
    return math.sqrt(alpha_cumprod) * sigma_data**2 / (alpha_cumprod * sigma_data**2 + 1 - alpha_cumprod)


def rms(x: torch.Tensor) -> torch.Tensor:
    """Per-sample root mean square, float32, shape (B,)."""
    return x.detach().float().flatten(1).square().mean(1).sqrt()
