"""The proximal data-consistency step on Tweedie's estimate, and the few-step sampler built on it.

DPS steps along ``∇_{x_t} d`` through the denoiser, one linearised step per sampler step; the official loop takes
1000 of them. With 20-30 steps that budget is gone, and on the project's pixel prior the hosts' Euler path stays
3-4 dB behind the official 1000 steps on super-resolution and deblurring (``bench/few_steps.py``). The fast
successors of DPS instead solve a small data-consistency problem on x0_hat at every step and re-noise the result:

    x0' = argmin_x  ½‖r(x)‖² + ½ρ‖x − x0_hat‖²,      ρ = λ s²/σ²                                    (1)

with ``r(x) = residual(y, A(D(x)))`` the noise model's residual (``dps.noise``: ``y − A(D(x))`` for Gaussian
noise, the 1/√(k+1)-weighted one for Poisson), ``D`` the decoder (identity for pixel models), ``s² = E‖n‖²/m`` the
noise model's variance per measured value (its floor ``expected_distance`` squared over the m values of ``y``) and
σ the sampler's noise level. (1) is DiffPIR's data subproblem (Zhu et al., CVPR 2023, eq. 13, with its
``ρ_t = λσ_n²/σ̄_t²``), written with the DPS measurement model and noise handling: ``‖r‖²/(2s²)`` is the Gaussian
negative log-likelihood, and for Poisson noise DPS's own weighted residual. Early (σ ≫ s) the data term
dominates and x0' fits ``y``; late (σ → 0) the proximity term keeps x0' at the prior's prediction.

(1) is solved as DDS does (Chung, Lee & Ye, ICLR 2024): a few conjugate-gradient iterations started at x0_hat,
here on one Gauss-Newton linearisation of ``r`` at x0_hat, ``(J_rᵀJ_r + ρI) δ = −J_rᵀ r(x0_hat)``,
``x0' = x0_hat + δ``, with ``J_r = ∂r/∂x`` (``−∂(A∘D)/∂x`` for Gaussian noise) applied by central differences and
its transpose by reverse-mode differentiation: exact (to rounding) for a linear ``A`` without a decoder, one
Gauss-Newton step through a nonlinear decoder. No gradient passes through the denoiser in (1), so its step costs
one denoiser evaluation and, per iteration, two decodes and one reverse-mode pass of the decoder (the reverse one
through a host's memory-bounded ``decoder_gradient`` when it has one).

Through the denoiser (mode "full"). (1) moves x0_hat only where the measurement sees it: for x4
super-resolution, by the upsampled low-resolution residual, which the prior's next evaluation has to turn into
detail. DPS's own step instead goes through the denoiser's Jacobian ``J = ∂x0_hat/∂x`` (x = x0 + σε), which keeps
a correction along the images the prior can produce. Before (1), x0_hat is moved by (1)'s first conjugate-gradient
iterate ``δ₁ = −α g`` carried back through that Jacobian:

    x0_hat ← x0_hat + κ Jᵀδ₁ = x0_hat − κ α ∇_x ½‖r(x0_hat(x))‖²,    α = ‖g‖² / (‖J_r g‖² + ρ‖g‖²)          (2)

with ``g = J_rᵀ r`` the gradient of ½‖r‖² at x0_hat (``−α g`` minimises (1)'s Gauss-Newton model along −g) and
κ = ``PULL``. So the move is DPS's gradient step through the denoiser (Chung et al. 2023, the gradient of the
squared residual), its length set by the data subproblem instead of a tuned ζ; then (1) is solved from the moved
prediction. The combination is this project's, measured on the pixel prior and the latent rehearsal
(``bench/README.md``, *The pull through the denoiser*); it costs one backward pass through the denoiser and
three decodes per step.

``dps.sampling.proximal_sample`` re-noises x0' to the next level with fresh noise, ``x_{i+1} = x0' + σ_{i+1} z``
(DiffPIR with its ζ = 1; ComfyUI's and the WebUI's LCM sampler take the same step from a denoised prediction).
Measured in ``bench/README.md`` (*The proximal data step*).
"""

from __future__ import annotations

from typing import Callable

import torch

from .autograd_safe import autograd_safe
from .guidance import DPSGuidance, GuidanceResult
from .rules import per_sample
from .validate import check_int, check_number

# λ of (1) and the conjugate-gradient iterations per step; chosen on the tuning digits 50-57 (bench/README.md).
LAMBDA = 0.3
ITERATIONS = 5
# The share of (2)'s move, chosen on the same tuning digits (bench/README.md, *The pull through the denoiser*).
PULL = 2.0
PULL_FIX = "the share of (2)'s move; 2 is the measured default, 0 turns it off"


# The hosts' samplers whose step re-noises the prediction with fresh noise alone, x_{i+1} = x0' + σ_{i+1} z: the rule
# "proximal" is made for them (ComfyUI's ``lcm``, function ``sample_lcm``; the WebUI's ``LCM``).
RENOISING_SAMPLERS = frozenset({"lcm"})


def sampler_note(rule: str, sampler: str) -> str | None:
    """What to tell a user who guides the host sampler named ``sampler`` with the step rule ``rule``, or None when
    they suit each other. Measured on the latent rehearsal (``bench/results/host_defaults_proximal_pull_30.json``,
    ``..._proximal_pull_deterministic_30.json``)."""
    name = sampler.lower().removeprefix("sample_").replace(" ", "_")
    if rule != "proximal" or name in RENOISING_SAMPLERS:
        return None
    return (f"the step rule 'proximal' is made for the LCM sampler, which re-noises its prediction with fresh noise "
            f"at every step; {sampler} re-uses its noise estimate, which carries the correction back out (box "
            "inpainting at 30 steps on the latent rehearsal: 15.6 dB with euler against 19.2 with lcm). Pick the "
            "LCM sampler, or the step rule polyak")


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product, float64, shape (B,)."""
    return (a.double() * b.double()).flatten(1).sum(1)


def noise_variance(guidance: DPSGuidance) -> float:
    """``s²`` of (1): the noise model's floor ``E‖n‖`` squared over the number of measured values per sample."""
    y = guidance.y.detach()
    floor = float(guidance.noise.expected_distance(y[:1]).float()[0])
    return floor**2 / max(y[0].numel(), 1)


def _finite_jvp(fn: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, v: torch.Tensor,
                dtype: torch.dtype) -> torch.Tensor:
    """``J_fn(z0) v`` by central differences, ``(fn(z0 + hv) − fn(z0 − hv))/(2h)`` per sample, with ``h·RMS(v)`` the
    cube root of ``dtype``'s epsilon times ``max(RMS(z0), 1)`` (the step that balances truncation and rounding
    errors of a decoder computing in ``dtype``: ~5e-3 relative in float32, ~0.1 in float16). No graph and no
    forward-mode differentiation: any host decoder runs as it does for a decode (forward-mode differentiation
    crashed the process on a ComfyUI decoder with inference-tensor weights, a fast decoder at 128 px)."""
    with torch.no_grad():
        scale = z0.flatten(1).square().mean(1).sqrt().clamp_min(1.0)
        size = v.flatten(1).square().mean(1).sqrt()
        h = torch.finfo(dtype).eps ** (1 / 3) * scale
        h = torch.where(size > 0, h / size.clamp_min(1e-30), torch.zeros_like(h))
        step = per_sample(h, z0) * v
        diff = fn(z0 + step).float() - fn(z0 - step).float()      # exactly 0 where v = 0 (h = 0)
    return diff / per_sample(2 * h.clamp_min(1e-30), diff)


def _reverse(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor
             ) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(fn(x), u ↦ J_fn(x)ᵀ u)`` from one kept graph (plain autograd, as the guidance's own gradients)."""
    leaf = x.detach().requires_grad_(True)
    out = fn(leaf)
    return out.detach(), lambda u: torch.autograd.grad(out, leaf, u.to(out.dtype), retain_graph=True)[0].float()


def _rho(guidance: DPSGuidance, sigma: float, lam: float) -> float:
    """ρ of (1): ``λ s²/σ²``."""
    return lam * noise_variance(guidance) / sigma**2


def _decode(guidance: DPSGuidance) -> Callable[[torch.Tensor], torch.Tensor]:
    """The guidance's decoder D as a function: ``decoder_gradient``'s decode (hosts), the plain decoder, or the
    identity for pixel models."""
    if guidance.decoder_gradient is not None:
        return guidance.decoder_gradient.decode
    return guidance.decoder if guidance.decoder is not None else (lambda z: z)


def _decoder(guidance: DPSGuidance, z0: torch.Tensor
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(D, D(z0), w ↦ J_D(z0)ᵀ w)`` for the guidance's decoder: the identity for pixel models; ``J_Dᵀ`` through
    ``decoder_gradient``'s planned, memory-bounded way when there is one (hosts), else from one kept graph."""
    decode = _decode(guidance)
    if guidance.decoder_gradient is not None:
        with torch.no_grad():
            image0 = decode(z0)
        return decode, image0, lambda w: guidance.decoder_gradient.vjp(z0, w.to(image0.dtype)).float()
    if guidance.decoder is None:
        return decode, z0, (lambda w: w)
    image0, transpose = _reverse(decode, z0)
    return decode, image0, transpose


def proximal_step(guidance: DPSGuidance, x0_hat: torch.Tensor, sigma: float, lam: float = LAMBDA,
                  iterations: int = ITERATIONS) -> torch.Tensor:
    """x0' of (1) in the module docstring for the prediction ``x0_hat`` at noise level ``sigma`` (> 0):
    ``iterations`` conjugate-gradient steps on the Gauss-Newton system ``(J_rᵀJ_r + ρI) δ = −J_rᵀ r`` with
    ``ρ = lam·s²/σ²``, per sample. ``guidance`` supplies ``y``, ``A``, the noise model and the decoder; its rule
    and ζ are not used (the rule ``"proximal"`` passes ``lam = LAMBDA/ζ``). A sample whose residual or step is not
    finite keeps its ``x0_hat``."""
    check_number("lam", lam, above=0, fix="λ of the proximal step; 0.3 is the measured default")
    check_int("iterations", iterations, minimum=1, fix="conjugate-gradient iterations per step, e.g. 5")
    check_number("sigma", sigma, above=0)
    rho = _rho(guidance, sigma, lam)
    with torch.inference_mode(False), torch.enable_grad():
        z0 = autograd_safe(x0_hat.detach()).float()      # a host's inference tensor, copied
        decode, image0, decoder_transpose = _decoder(guidance, z0)
        r0, image_transpose = _reverse(guidance.image_residual, image0.float())
        transpose = lambda u: decoder_transpose(image_transpose(u))                        # noqa: E731  J_rᵀ u
        chain = lambda z: guidance.image_residual(decode(z))                               # noqa: E731  r(x)
        forward = lambda v: _finite_jvp(chain, z0, v, image0.dtype)                         # noqa: E731  J_r v
        b = -transpose(r0)        # minus the gradient of ½‖r‖² at x0_hat
        delta = torch.zeros_like(z0)
        r, p = b.clone(), b.clone()
        rs = _dot(r, r)
        for _ in range(iterations):
            hp = transpose(forward(p)) + rho * p                  # (J_rᵀJ_r + ρI) p
            curvature = _dot(p, hp)
            alpha = torch.where(curvature > 0, rs / curvature.clamp_min(1e-300), torch.zeros_like(rs)).to(p.dtype)
            delta = delta + per_sample(alpha, p) * p
            r = r - per_sample(alpha, hp) * hp
            rs_next = _dot(r, r)
            beta = torch.where(rs > 0, rs_next / rs.clamp_min(1e-300), torch.zeros_like(rs)).to(p.dtype)
            p = r + per_sample(beta, r) * p
            rs = rs_next
    delta = delta.detach()
    finite = torch.isfinite(delta.flatten(1)).all(1) & torch.isfinite(r0.detach().flatten(1)).all(1)
    out = torch.where(per_sample(finite, z0), z0 + torch.nan_to_num(delta), z0)
    return out.to(x0_hat.dtype)


def first_iterate_length(guidance: DPSGuidance, x0_hat: torch.Tensor, g: torch.Tensor, sigma: float,
                         lam: float = LAMBDA) -> torch.Tensor:
    """Per sample, the α with which ``−α g`` is the first conjugate-gradient iterate of (1)'s Gauss-Newton system
    at ``x0_hat`` for the gradient ``g = J_rᵀ r`` of ½‖r‖² there: ``α = ‖g‖² / (‖J_r g‖² + ρ‖g‖²)``, the exact
    minimiser of the quadratic model along −g (0 where g = 0). Three decodes (one for the decoder's dtype, two for
    ``J_r g`` by central differences); no graph."""
    check_number("sigma", sigma, above=0)
    rho = _rho(guidance, sigma, lam)
    decode = _decode(guidance)
    with torch.no_grad():
        z0 = x0_hat.detach().float()
        dtype = decode(z0).dtype
        jg = _finite_jvp(lambda z: guidance.image_residual(decode(z)), z0, g.float(), dtype)
    gg = _dot(g, g)
    curvature = _dot(jg, jg) + rho * gg
    return torch.where(curvature > 0, gg / curvature.clamp_min(1e-300), torch.zeros_like(gg))


def proximal_prediction(guidance: DPSGuidance, result: GuidanceResult, sigma: float, scale: float = 1.0,
                        lam: float = LAMBDA, iterations: int = ITERATIONS, pull: float = PULL) -> torch.Tensor:
    """x0' of (1) for the evaluation ``result`` at the level ``sigma`` of ``x/scale = x0 + σε`` (``scale``: 1 in
    σ-space, α for flow models, √ᾱ for a VP x_t), from x0_hat moved first by (2) when ``result`` carries the
    gradients through the denoiser (mode "full": ``result.x0_grad`` = g = ∇_{x0_hat} ½‖r‖², ``result.grad`` =
    ∇_{x_t} ½‖r‖² = J_{x_t}ᵀ g), ``x0_hat − pull · α · scale · J_{x_t}ᵀ g`` with α of
    ``first_iterate_length``; the denoiser's Jacobian with respect to ``x/scale`` is ``scale·J_{x_t}``. Without
    them (mode "x0_only"), ``proximal_step`` of x0_hat itself. A sample whose move is not finite is not moved."""
    check_number("pull", pull, minimum=0, fix=PULL_FIX)
    x0_hat = result.x0_hat
    if result.x0_grad is not None and pull > 0:
        alpha = first_iterate_length(guidance, x0_hat, result.x0_grad, sigma, lam)
        move = per_sample(pull * scale * alpha, result.grad).to(result.grad.dtype) * result.grad
        finite = torch.isfinite(move.flatten(1)).all(1)
        x0_hat = torch.where(per_sample(finite, x0_hat), x0_hat - torch.nan_to_num(move).to(x0_hat), x0_hat)
    return proximal_step(guidance, x0_hat, sigma, lam, iterations)
