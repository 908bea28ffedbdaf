"""Sampler families: how a k-diffusion sampler combines its denoised predictions into its x-update, and the
adapter that makes a guided update receive the intended correction while the prior keeps its solver's order.

Guidance reaches a σ-space sampler only through the prediction it returns: ``D'_i = D_i + c'_i``. A single-step
sampler (Euler, its ancestral form, Heun, DPM-2, ...) weighs the current prediction alone, so ``c'_i = c_i``, the
rule's correction (``dps.host.guided_correction``), has the effect the rule intends. A linear multistep sampler
weighs the predictions of several steps,

    x_{i+1} = a_i x_i + W_i Σ_j b_{i,j} D_{i−j} (+ noise),     Σ_j b_{i,j} = 1,

where ``W_i`` is the weight its first-order member (DDIM, the first-order DPM-Solver++ step) gives ``D_i``, and
``b_{i,0} = 1 + (higher-order terms)`` extrapolates. Fed ``c_i`` unchanged, the guidance part of the update is
``W_i Σ_j b_{i,j} c_{i−j}``: the extrapolation amplifies every change of the correction between steps. Feeding

    c'_i = (c_i − Σ_{j≥1} b_{i,j} c'_{i−j}) / b_{i,0}

makes it exactly ``W_i c_i``, the first-order step of the intended correction, while the prior's predictions
``D_{i−j}`` keep their higher-order weights. For DPM-Solver++(2M) ``b = (1 + k, −k)`` with ``k = 1/(2r)``,
``r = h_{i−1}/h_i``, so ``c'_i = (c_i + k c'_{i−1})/(1 + k)``, a convex combination: the recursion is stable.

The update rules are those of k-diffusion's ``sampling.py`` as ComfyUI ships it (comfy/k_diffusion/sampling.py
@ a125cd84): ``sample_dpmpp_2m`` (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, with h in −log σ),
``sample_dpmpp_2m_sde`` (midpoint and heun corrections, h in half-log-SNR λ = log(α/σ)) and ``sample_dpmpp_3m_sde``.
Samplers are named as k-diffusion names its functions, without ``sample_`` (the WebUI's k-samplers are the same
functions). ``family_for`` returns None for a sampler it does not know; the caller then keeps ``c'_i = c_i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

AlphaFn = Callable[[float], float]


def _one(sigma: float) -> float:
    return 1.0


def half_log_snr(sigma: float, alpha: AlphaFn = _one) -> float:
    """λ = log(α/σ) for ``x = α x0 + σε`` (k-diffusion: α = 1, λ = −log σ; flow models: α = 1 − σ, kept above
    zero at σ = 1, which a sampler never evaluates there)."""
    return math.log(max(alpha(sigma), 1e-12) / sigma)


class SingleStep:
    """Samplers whose x-update uses the current prediction only (``b = (1,)``): the correction passes unchanged."""

    name = "single-step"
    history = 0          # earlier predictions the update uses

    def weights(self, sigmas: Sequence[float], i: int, alpha: AlphaFn = _one) -> tuple[float, ...]:
        return (1.0,)


class DPMSolver2M:
    """DPM-Solver++(2M): ``x_{i+1} = (σ_{i+1}/σ_i) x_i − expm1(−h) ((1 + k) D_i − k D_{i−1})``, ``k = 1/(2r)``,
    ``r = h_{i−1}/h_i``, h in −log σ; first order (``b = (1,)``) at the first step and the step to σ = 0."""

    name = "dpmpp_2m"
    history = 1

    def weights(self, sigmas: Sequence[float], i: int, alpha: AlphaFn = _one) -> tuple[float, ...]:
        if i == 0 or sigmas[i + 1] <= 0:
            return (1.0,)
        h = math.log(sigmas[i] / sigmas[i + 1])
        h_last = math.log(sigmas[i - 1] / sigmas[i])
        k = h / (2 * h_last)
        return (1 + k, -k)


@dataclass(frozen=True)
class DPMSolver2MSDE:
    """DPM-Solver++(2M) SDE: ``x_{i+1} = (σ_{i+1}/σ_i) e^{−ηh} x_i + W D_i + corr + noise`` with h in λ,
    ``W = α_{i+1}(1 − e^{−(1+η)h})`` and ``corr = W/(2r) (D_i − D_{i−1})`` (midpoint) or
    ``α_{i+1} φ/r (D_i − D_{i−1})``, ``φ = 1 − (1 − e^{−u})/u``, u = (1+η)h (heun)."""

    eta: float = 1.0
    solver: str = "midpoint"
    name: str = field(default="dpmpp_2m_sde", init=False)
    history: int = field(default=1, init=False)

    def __post_init__(self) -> None:
        if self.solver not in ("midpoint", "heun"):
            raise ValueError(f"solver must be 'midpoint' or 'heun', got {self.solver!r}")

    def weights(self, sigmas: Sequence[float], i: int, alpha: AlphaFn = _one) -> tuple[float, ...]:
        if i == 0 or sigmas[i + 1] <= 0:
            return (1.0,)
        lam = [half_log_snr(sigmas[j], alpha) for j in (i - 1, i, i + 1)]
        h, h_last = lam[2] - lam[1], lam[1] - lam[0]
        u = h * (self.eta + 1)
        r = h_last / h
        if self.solver == "midpoint":
            k = 1 / (2 * r)
        else:
            k = (1 - (-math.expm1(-u)) / u) / (-math.expm1(-u)) / r
        return (1 + k, -k)


@dataclass(frozen=True)
class DPMSolver3MSDE:
    """DPM-Solver++(3M) SDE: the 2M SDE's first-order step plus ``α_{i+1}(φ₂ d₁ − φ₃ d₂)`` from the divided
    differences of D_i, D_{i−1}, D_{i−2} (``φ₂ = 1 − (1 − e^{−u})/u``, ``φ₃ = φ₂/u − 1/2``, u = (1+η)h);
    the 2M SDE (heun-type) form at the second step."""

    eta: float = 1.0
    name: str = field(default="dpmpp_3m_sde", init=False)
    history: int = field(default=2, init=False)

    def weights(self, sigmas: Sequence[float], i: int, alpha: AlphaFn = _one) -> tuple[float, ...]:
        if i == 0 or sigmas[i + 1] <= 0:
            return (1.0,)
        lam = [half_log_snr(sigmas[j], alpha) if j >= 0 else 0.0 for j in (i - 2, i - 1, i, i + 1)]
        h = lam[3] - lam[2]
        u = h * (self.eta + 1)
        w = -math.expm1(-u)                       # W / α_{i+1}
        phi_2 = 1 - w / u
        r0 = (lam[2] - lam[1]) / h
        if i == 1:                                # d = (D_i − D_{i−1})/r
            k = phi_2 / r0 / w
            return (1 + k, -k)
        phi_3 = phi_2 / u - 0.5
        r1 = (lam[1] - lam[0]) / h
        d1_0 = (1 / r0, -1 / r0, 0.0)
        d1_1 = (0.0, 1 / r1, -1 / r1)
        d1 = [a + (a - b) * r0 / (r0 + r1) for a, b in zip(d1_0, d1_1)]
        d2 = [(a - b) / (r0 + r1) for a, b in zip(d1_0, d1_1)]
        higher = [(phi_2 * p - phi_3 * q) / w for p, q in zip(d1, d2)]
        return (1 + higher[0], higher[1], higher[2])


def _sde_options(options: Mapping) -> dict:
    return {"eta": float(options.get("eta", 1.0))}


# k-diffusion sampler name -> family, built from the sampler's options (ComfyUI's KSAMPLER.extra_options).
FAMILIES: dict[str, Callable[[Mapping], object]] = {
    **{name: (lambda options: SingleStep()) for name in (
        "euler", "euler_ancestral", "euler_ancestral_RF", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
        "dpm_2_ancestral_RF", "dpmpp_2s_ancestral", "dpmpp_2s_ancestral_RF", "dpmpp_sde", "dpmpp_sde_gpu",
        "ddpm", "lcm", "euler_cfg_pp", "euler_ancestral_cfg_pp", "dpmpp_2s_ancestral_cfg_pp")},
    "dpmpp_2m": lambda options: DPMSolver2M(),
    **{name: (lambda options: DPMSolver2MSDE(solver=options.get("solver_type", "midpoint"), **_sde_options(options)))
       for name in ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu")},
    **{name: (lambda options: DPMSolver2MSDE(solver=options.get("solver_type", "heun"), **_sde_options(options)))
       for name in ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu")},
    **{name: (lambda options: DPMSolver3MSDE(**_sde_options(options))) for name in ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu")},
}


def family_for(sampler: str, options: Mapping | None = None):
    """The family of the k-diffusion sampler ``sampler`` (``"dpmpp_2m"``; a ``sample_`` prefix is dropped), set up
    with its ``options`` (eta, solver_type); None when the sampler is not known here."""
    name = sampler[len("sample_"):] if sampler.startswith("sample_") else sampler
    make = FAMILIES.get(name)
    return None if make is None else make(dict(options or {}))


class CorrectionFilter:
    """Per sampling run: turns the rule's correction ``c_i`` at schedule level σ_i into the one to feed, ``c'_i``,
    so that the sampler's update receives ``W_i c_i`` (module docstring). Levels the sampler skipped or did not
    guide count as ``c' = 0``; a call at a σ that is not a schedule level passes ``c`` unchanged."""

    def __init__(self, family, sigmas: torch.Tensor | Sequence[float], alpha: AlphaFn | None = None) -> None:
        self.family = family
        self.sigmas = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
        self.alpha = alpha or _one
        self.fed: dict[int, torch.Tensor] = {}

    def index(self, sigma: float) -> int | None:
        """The step whose level is ``sigma`` (None between levels). The first level also matches a σ a little
        below it: k-diffusion's SDE samplers move a flow model's σ = 1 just inside the valid range."""
        for i, level in enumerate(self.sigmas[:-1]):
            if abs(sigma - level) <= 1e-5 * level:
                return i
        top = self.sigmas[0] if self.sigmas else 0.0
        return 0 if top > 0 and top * (1 - 1e-3) <= sigma < top else None

    def __call__(self, sigma: float, correction: torch.Tensor) -> torch.Tensor:
        i = self.index(sigma)
        if i is None:
            return correction
        if i == 0:
            self.sigmas[0] = sigma      # the σ the sampler steps from (the flow models' offset first σ)
        self.fed = {j: c for j, c in self.fed.items() if j < i}   # a sampler that starts again forgets
        b = self.family.weights(self.sigmas, i, self.alpha)
        fed = correction
        for j, weight in enumerate(b[1:], start=1):
            previous = self.fed.get(i - j)
            if previous is not None:
                fed = fed - weight * previous
        fed = fed / b[0] if b[0] != 1.0 else fed
        self.fed[i] = fed
        return fed
