"""Host-free reference samplers, with optional DPS guidance.

* ``ddpm_sample``: ancestral DDPM for an ε-prediction model ``eps_model(x, t)`` (t: training indices,
  shape (B,)), reproducing the official DPS loop (``p_sample_loop``): x̂0 by Tweedie, clipped to
  [-1, 1] (``clip_denoised=True``), the DDPM step, then ``x_{t-1} = x'_{t-1} − size·∇``. The variance
  is the fixed posterior variance β̃_t (the official model learns it; ours predict ε only).
* ``ddim_sample``: DDIM (Song et al. 2021, eq. 12) with ``eta``, guided the same way.
* ``proximal_sample``: x0_hat made to fit the measurement at each level (``dps.proximal``), then fresh noise.
* ``euler_sample`` / ``heun_sample``: σ-space samplers over a denoiser ``D(x, σ)`` with x = x0 + σε,
  the convention of k-diffusion, ComfyUI and the WebUI; guidance is a correction of D
  (``dps.guidance.denoised_correction``), exactly as the host adapters apply it.

Every sampler takes ``callback(info: dict)``, called once per step with the step index, the state and
(when guided) the per-sample distance.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .guidance import DPSGuidance, GuidanceResult, rms, vp_x0_jacobian
from .host import guided_denoised
from .progress import progress_bar, sigma_progress, step_progress
from .proximal import ITERATIONS, LAMBDA, PULL, PULL_FIX, proximal_prediction
from .rules import per_sample
from .schedule import (Respaced, alphas_cumprod_from_betas, check_alphas_cumprod, check_betas, check_sigmas,
                       linear_betas, respace, sigma_from_alpha_cumprod, vp_sigma)
from .validate import check_callable, check_int, check_number, check_shape, check_tensor

EpsModel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def tweedie_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_cumprod: float) -> torch.Tensor:
    """x̂0 = (x_t − √(1−ᾱ) ε̂) / √ᾱ (Tweedie's formula for an ε-prediction model)."""
    return (x_t - math.sqrt(1 - alpha_cumprod) * eps) / math.sqrt(alpha_cumprod)


def _noise(shape: torch.Size, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.randn(shape, generator=generator, device=device, dtype=like.dtype).to(like.device)


def _x0_and_guidance(eps_model: EpsModel, x: torch.Tensor, t: int, ac: float, clip: bool,
                     guidance: DPSGuidance | None, progress: float) -> tuple[torch.Tensor, GuidanceResult | None]:
    t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)

    def x0_fn(x_t: torch.Tensor) -> torch.Tensor:
        x0 = tweedie_x0(x_t, eps_model(x_t, t_batch), ac)
        return x0.clamp(-1, 1) if clip else x0

    if guidance is None or not guidance.active(progress):
        with torch.no_grad():
            return x0_fn(x), None
    result = guidance.evaluate(x, x0_fn)
    replaced = guidance.step_rule.prediction(guidance, result, vp_sigma(ac), math.sqrt(ac))   # x/√ᾱ = x0 + σε
    if replaced is not None:     # the rule replaces x0_hat (``"proximal"``): the step is taken from x0', no x-step
        return replaced, None
    return result.x0_hat, result


def _guided_update(x_prev: torch.Tensor, x_t: torch.Tensor, result: GuidanceResult | None,
                   guidance: DPSGuidance | None, beta: float, ac: float) -> torch.Tensor:
    if result is None or guidance is None:
        return x_prev
    grad = guidance.step_gradient(result, vp_x0_jacobian(ac, guidance.sigma_data), limit=rms(x_t))
    step = guidance.check_step(guidance.step_rule.ddpm_step_size(guidance.zeta, beta, ac) * grad, x_t)
    return x_prev - step


def ddpm_sample(eps_model: EpsModel, shape: tuple[int, ...], steps: int = 1000,
                guidance: DPSGuidance | None = None, betas: torch.Tensor | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                clip_x0: bool = True, x_T: torch.Tensor | None = None, show_progress: bool = False,
                callback: Callback | None = None) -> torch.Tensor:
    """Ancestral DDPM sampling, respaced to ``steps`` (the official DPS loop when ``steps=1000``)."""
    _check_vp_args(eps_model, shape, steps, guidance, betas, generator, x_T, callback)
    sched = respace(alphas_cumprod_from_betas(linear_betas() if betas is None else betas), steps)
    x = x_T.to(device) if x_T is not None else _noise(torch.Size(shape), torch.empty(0, device=device), generator)
    return _vp_loop(eps_model, x, sched, guidance, generator, clip_x0, show_progress, callback, eta=None)


def ddim_sample(eps_model: EpsModel, shape: tuple[int, ...], steps: int = 100, eta: float = 0.0,
                guidance: DPSGuidance | None = None, betas: torch.Tensor | None = None,
                generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                clip_x0: bool = True, x_T: torch.Tensor | None = None, show_progress: bool = False,
                callback: Callback | None = None) -> torch.Tensor:
    """DDIM sampling (``eta = 0``: deterministic), with DPS applied as in ``ddpm_sample``."""
    _check_vp_args(eps_model, shape, steps, guidance, betas, generator, x_T, callback)
    check_number("eta", eta, minimum=0, maximum=1, fix="0 is deterministic DDIM, 1 has DDPM's noise")
    sched = respace(alphas_cumprod_from_betas(linear_betas() if betas is None else betas), steps)
    x = x_T.to(device) if x_T is not None else _noise(torch.Size(shape), torch.empty(0, device=device), generator)
    return _vp_loop(eps_model, x, sched, guidance, generator, clip_x0, show_progress, callback, eta=eta)


def _check_guidance(guidance: object, generator: object, callback: object) -> None:
    if guidance is not None and not isinstance(guidance, DPSGuidance):
        raise TypeError(f"guidance must be a dps.DPSGuidance or None, got {type(guidance).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
                        "e.g. torch.Generator().manual_seed(0)")
    if callback is not None:
        check_callable("callback", callback, "a function callback(info: dict) or None")


def _check_vp_args(eps_model: object, shape: object, steps: object, guidance: object, betas: object,
                   generator: object, x_T: object, callback: object) -> None:
    """Refuse bad arguments of the VP samplers before any model call (TypeError/ValueError naming them)."""
    check_callable("eps_model", eps_model, "an ε-prediction model eps_model(x, t)")
    shape = check_shape("shape", shape)
    total = len(check_betas(betas)) if betas is not None else 1000
    check_int("steps", steps, minimum=1, maximum=total, fix=f"respaced steps of the {total}-step schedule")
    if x_T is not None:
        check_tensor("x_T", x_T, floating=True, finite=True, fix="start from finite noise, e.g. torch.randn(shape)")
        if tuple(x_T.shape) != shape:
            raise ValueError(f"x_T has shape {tuple(x_T.shape)} but shape is {shape}; pass shape=tuple(x_T.shape)")
    _check_guidance(guidance, generator, callback)


def _vp_loop(eps_model: EpsModel, x: torch.Tensor, sched: Respaced, guidance: DPSGuidance | None,
             generator: torch.Generator | None, clip: bool, show_progress: bool, callback: Callback | None,
             eta: float | None) -> torch.Tensor:
    n = len(sched.timesteps)
    for i in progress_bar(range(n - 1, -1, -1), total=n, enabled=show_progress, desc="sampling"):
        t, ac, beta = int(sched.timesteps[i]), float(sched.alphas_cumprod[i]), float(sched.betas[i])
        ac_prev = float(sched.alphas_cumprod[i - 1]) if i > 0 else 1.0
        progress = step_progress(n - 1 - i, n)
        x0, result = _x0_and_guidance(eps_model, x, t, ac, clip, guidance, progress)
        with torch.no_grad():
            if eta is None:
                x_prev = ddpm_posterior_step(x, x0, ac, ac_prev, beta, _noise(x.shape, x, generator) if i > 0 else None)
            else:
                x_prev = ddim_step(x, x0, ac, ac_prev, eta, _noise(x.shape, x, generator) if i > 0 else None)
            x = _guided_update(x_prev, x, result, guidance, beta, ac)
        if callback is not None:
            callback({"i": n - 1 - i, "t": t, "x": x, "x0_hat": x0,
                      "distance": None if result is None else result.distance})
    return x


def ddpm_posterior_step(x_t: torch.Tensor, x0: torch.Tensor, ac: float, ac_prev: float, beta: float,
                        z: torch.Tensor | None) -> torch.Tensor:
    """One ancestral step from q(x_{t-1} | x_t, x0) (Ho et al. 2020, eqs. 6-7): mean
    ``(√ᾱ_{t-1} β_t x0 + √α_t (1 − ᾱ_{t-1}) x_t) / (1 − ᾱ_t)``, variance ``β_t (1 − ᾱ_{t-1}) / (1 − ᾱ_t)``."""
    alpha = 1.0 - beta
    mean = (math.sqrt(ac_prev) * beta * x0 + math.sqrt(alpha) * (1 - ac_prev) * x_t) / (1 - ac)
    if z is None:
        return mean
    return mean + math.sqrt(beta * (1 - ac_prev) / (1 - ac)) * z


def ddim_step(x_t: torch.Tensor, x0: torch.Tensor, ac: float, ac_prev: float, eta: float,
              z: torch.Tensor | None) -> torch.Tensor:
    """One DDIM step (Song et al. 2021, eq. 12) with ε̂ recomputed from the (clipped) x0."""
    eps = (x_t - math.sqrt(ac) * x0) / math.sqrt(1 - ac)
    sigma = eta * math.sqrt((1 - ac_prev) / (1 - ac) * (1 - ac / ac_prev)) if ac_prev < 1 else 0.0
    x_prev = math.sqrt(ac_prev) * x0 + math.sqrt(max(1 - ac_prev - sigma**2, 0.0)) * eps
    return x_prev if z is None or sigma == 0 else x_prev + sigma * z


class GuidedDenoiser:
    """Wrap ``D(x, σ)`` so that it returns the guided prediction ``D' = D + correction``.

    ``progress_fn(σ)`` maps a noise level to the sampling progress in [0, 1] (for start/end).
    ``delta_sigma`` is the σ decrease of the current sampler step (None: posterior-score form).
    """

    def __init__(self, denoiser: Denoiser, guidance: DPSGuidance,
                 progress_fn: Callable[[float], float]) -> None:
        self.denoiser = denoiser
        self.guidance = guidance
        self.progress_fn = progress_fn
        self.last_distance: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: float, delta_sigma: float | None = None) -> torch.Tensor:
        s_in = x.new_full((x.shape[0],), sigma)
        if sigma <= 0 or not self.guidance.active(self.progress_fn(sigma)):
            with torch.no_grad():
                return self.denoiser(x, s_in)
        result = self.guidance.evaluate(x, lambda x_: self.denoiser(x_, s_in))
        self.last_distance = result.distance
        return guided_denoised(result, self.guidance, sigma, delta_sigma, x)


def eps_denoiser(eps_model: EpsModel, alphas_cumprod: torch.Tensor) -> Denoiser:
    """``D(x, σ)`` for ``x = x0 + σε`` from an ε-prediction model on the discrete VP process (k-diffusion's
    ``DiscreteEpsDDPMDenoiser``, with t the training timestep nearest to σ): ``D = x − σ ε(√ᾱ_t x, t)``, since
    ``x_t = √ᾱ_t x`` is the model's input at σ = √((1 − ᾱ_t)/ᾱ_t)."""
    check_callable("eps_model", eps_model, "an ε-model eps_model(x, t)")
    check_alphas_cumprod(alphas_cumprod)
    sigmas = sigma_from_alpha_cumprod(alphas_cumprod).float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigmas[None].to(sigma.device) - sigma.float().view(-1, 1)).abs().argmin(dim=1)
        ac = per_sample(alphas_cumprod.to(x.device)[t].to(x.dtype), x)
        return x - per_sample(sigma.to(x.dtype), x) * eps_model(x * ac.sqrt(), t)
    return denoise


def _sigma_progress(sigmas: torch.Tensor) -> Callable[[float], float]:
    top, bottom = float(sigmas[0]), float(sigmas[sigmas > 0].min())
    return lambda sigma: sigma_progress(sigma, top, bottom)


def euler_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, guidance: DPSGuidance | None = None,
                 show_progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """Euler's method on the probability-flow ODE ``dx/dσ = (x − D(x, σ))/σ`` (Karras et al. 2022, alg. 1
    without churn); ``x`` starts at ``sigmas[0]`` noise scale."""
    _check_sigma_args(denoiser, x, sigmas, guidance, callback)
    return _sigma_loop(denoiser, x, sigmas, guidance, show_progress, callback, heun=False)


def heun_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, guidance: DPSGuidance | None = None,
                show_progress: bool = False, callback: Callback | None = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, alg. 1 without churn); Euler for the last step to 0."""
    _check_sigma_args(denoiser, x, sigmas, guidance, callback)
    return _sigma_loop(denoiser, x, sigmas, guidance, show_progress, callback, heun=True)


def _check_sigma_args(denoiser: object, x: object, sigmas: object, guidance: object, callback: object) -> None:
    """Refuse bad arguments of the σ-space samplers before any model call."""
    check_callable("denoiser", denoiser, "a denoiser D(x, sigma)")
    check_tensor("x", x, floating=True, finite=True, fix="start from finite noise, e.g. torch.randn(shape) * sigmas[0]")
    check_sigmas(sigmas)
    _check_guidance(guidance, None, callback)


def _sigma_loop(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, guidance: DPSGuidance | None,
                show_progress: bool, callback: Callback | None, heun: bool) -> torch.Tensor:
    if guidance is not None:
        model: Callable[..., torch.Tensor] = GuidedDenoiser(denoiser, guidance, _sigma_progress(sigmas))
    else:
        def model(x_: torch.Tensor, sigma: float, delta_sigma: float | None = None) -> torch.Tensor:
            with torch.no_grad():
                return denoiser(x_, x_.new_full((x_.shape[0],), sigma))
    n = len(sigmas) - 1
    for i in progress_bar(range(n), total=n, enabled=show_progress, desc="sampling"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model(x, sigma, sigma - sigma_next)
        with torch.no_grad():
            d = (x - denoised) / sigma
            x_next = x + (sigma_next - sigma) * d
            if heun and sigma_next > 0:
                denoised_2 = model(x_next, sigma_next, sigma - sigma_next)
                d_2 = (x_next - denoised_2) / sigma_next
                x_next = x + (sigma_next - sigma) * (d + d_2) / 2
        x = x_next
        if callback is not None:
            distance = model.last_distance if isinstance(model, GuidedDenoiser) else None
            callback({"i": i, "sigma": sigma, "x": x, "x0_hat": denoised, "distance": distance})
    return x


def proximal_sample(denoiser: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, guidance: DPSGuidance,
                    lam: float = LAMBDA, iterations: int = ITERATIONS, generator: torch.Generator | None = None,
                    show_progress: bool = False, callback: Callback | None = None, pull: float = PULL) -> torch.Tensor:
    """Sample with the proximal data step (``dps.proximal``; DiffPIR's sampler with its ζ = 1): at each level
    ``σ_i`` of ``sigmas`` (descending, ending at 0), ``x0_hat = D(x, σ_i)`` and, while ``guidance.active``,
    x0' from ``dps.proximal.proximal_prediction`` (in the guidance's mode "full" x0_hat first moved by (2)
    through the denoiser, ``pull`` its share; then the data step (1)), then ``x ← x0' + σ_{i+1} z`` with fresh
    noise ``z`` (the last step returns x0'). ``x`` starts at ``sigmas[0]``'s noise scale, ``D(x, σ)`` is a denoiser
    with ``x = x0 + σε`` (k-diffusion's convention). The guidance's rule and ζ are not used (``lam`` is λ), its
    mode is. ``callback`` gets the step index, σ, the new x, x0' and the per-sample distance of x0'."""
    _check_sigma_args(denoiser, x, sigmas, guidance, callback)
    if guidance is None:
        raise TypeError("guidance must be a dps.DPSGuidance: the proximal sampler's step is the data step")
    check_number("lam", lam, above=0, fix="λ of the proximal step; 0.3 is the measured default")
    check_int("iterations", iterations, minimum=1, fix="conjugate-gradient iterations per step, e.g. 5")
    check_number("pull", pull, minimum=0, fix=PULL_FIX)
    if float(sigmas[-1]) != 0:
        raise ValueError("sigmas must end at 0 (the last step returns the data-consistent prediction)")
    progress = _sigma_progress(sigmas)
    if guidance.rule != "proximal":      # its rule and ζ are not used (``lam`` is λ); its mode is
        guidance = dataclasses.replace(guidance, rule="proximal")
    n = len(sigmas) - 1
    for i in progress_bar(range(n), total=n, enabled=show_progress, desc="sampling"):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        level = x.new_full((x.shape[0],), sigma)
        if guidance.active(progress(sigma)):
            result = guidance.evaluate(x, lambda x_: denoiser(x_, level))
            x0 = proximal_prediction(guidance, result, sigma, lam=lam, iterations=iterations, pull=pull)
        else:
            with torch.no_grad():
                x0 = denoiser(x, level)
        if sigma_next > 0:
            device = generator.device if generator is not None else x.device
            x = x0 + sigma_next * torch.randn(x.shape, generator=generator, device=device).to(x)
        else:
            x = x0
        if callback is not None:
            callback({"i": i, "sigma": sigma, "x": x, "x0_hat": x0, "distance": guidance.distance(x0).detach()})
    return x
