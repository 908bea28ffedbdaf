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

The predictions themselves are evaluated at guided states, so each carries the prior's response to the guided
moves before it, which is not smooth along the trajectory. A step that extrapolates far (gain ``Σ_j |b_{i,j}|``
above ``MAX_GAIN``) multiplies that response; such a step is taken at first order, prior included
(``CorrectionFilter``): the update receives ``W_i (D_i + c_i)``. Unguided steps never change.

The update rules are those of k-diffusion's ``sampling.py`` as ComfyUI ships it (comfy/k_diffusion/sampling.py
@ a125cd84): ``sample_dpmpp_2m`` (Lu et al. 2022, arXiv 2211.01095, Algorithm 2, with h in −log σ),
``sample_dpmpp_2m_sde`` (midpoint and heun corrections, h in half-log-SNR λ = log(α/σ)) and ``sample_dpmpp_3m_sde``.
Samplers are named as k-diffusion names its functions, without ``sample_`` (the WebUI's k-samplers are the same
functions). ``family_for`` returns None for a sampler it does not know.

The CFG++ samplers (Chung et al. 2024, arXiv 2406.08070; ComfyUI's ``*_cfg_pp``) take x0 from the guided prediction
``D`` and the direction back to the noise from the unconditional one ``D_u``; Euler's form is
``x_{i+1} = D_i + σ_{i+1}(x_i − D_{u,i})/σ_i``. Each reduces to its base sampler when ``D = D_u``. DPS's correction
is a change of the model's prediction under every condition (the likelihood term belongs to the unconditional prior
as much as to the conditional one), so a host feeds it to both, ``D + c`` and ``D_u + c``; the x-update then
receives it as the base sampler's does (Euler: ``(1 − σ_{i+1}/σ_i) c``), and the base sampler's family applies
(``base_sampler``). Fed to ``D`` alone it would enter with weight 1, the rule's step ``σ_i/(σ_i − σ_{i+1})`` times
over.

For a sampler without a written-out family (LMS, iPNDM, DEIS, res_multistep, UniPC, ...) ``probe_family`` reads the
weights off the sampler function itself. With fixed σ levels and no noise, a sampler that evaluates the model once
per level is linear in its start ``x_0`` and its predictions: the state it evaluates at level i+1 is

    x_{i+1} = a_i x_i + Σ_{m ≤ i} w_{i,m} D_m.

Run on a probe batch whose column m < n receives D_k = δ_{km} from x_0 = 0 and whose last column starts at x_0 = 1
with D = 0, the recorded states give ``a_i`` (last column) and ``w_{i,m} = x_{i+1} − a_i x_i`` (column m). For a
consistent sampler Σ_m w_{i,m} is the first-order weight ``W_i`` (a constant prediction is integrated exactly), so
``b_{i,j} = w_{i,i−j} / W_i`` is the row the filter needs. A sampler that evaluates between levels, adds noise it
cannot be told to leave out, mixes the columns or breaks the recursion's stability gets None.
"""

from __future__ import annotations

import inspect
import math
import sys
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
        "ddpm", "lcm")},
    "dpmpp_2m": lambda options: DPMSolver2M(),
    **{name: (lambda options: DPMSolver2MSDE(solver=options.get("solver_type", "midpoint"), **_sde_options(options)))
       for name in ("dpmpp_2m_sde", "dpmpp_2m_sde_gpu")},
    **{name: (lambda options: DPMSolver2MSDE(solver=options.get("solver_type", "heun"), **_sde_options(options)))
       for name in ("dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu")},
    **{name: (lambda options: DPMSolver3MSDE(**_sde_options(options))) for name in ("dpmpp_3m_sde", "dpmpp_3m_sde_gpu")},
}


CFG_PP = "_cfg_pp"     # ComfyUI's suffix of a CFG++ sampler's name (module docstring)


def base_sampler(sampler: str) -> str:
    """The k-diffusion name of ``sampler`` without a ``sample_`` prefix, and of a CFG++ sampler its base sampler's
    (``"sample_dpmpp_2m_cfg_pp"`` → ``"dpmpp_2m"``): the one whose update the guidance part follows when the
    correction reaches both predictions (module docstring)."""
    name = sampler.removeprefix("sample_")
    return name.removesuffix(CFG_PP)


def family_for(sampler: str, options: Mapping | None = None):
    """The family of the k-diffusion sampler ``sampler`` (``"dpmpp_2m"``; ``base_sampler`` of the name), set up
    with its ``options`` (eta, solver_type); None when the sampler is not known here."""
    make = FAMILIES.get(base_sampler(sampler))
    return None if make is None else make(dict(options or {}))


# The extrapolation gain Σ_j |b_{i,j}| above which a guided step is taken at first order (``CorrectionFilter``):
# a 2M-type step gains about 2 on an even schedule, 3M SDE 3.3-5, UniPC 5-7 (bench/README.md, *Every sampler*).
MAX_GAIN = 4.0


def gain(row: Sequence[float]) -> float:
    """``Σ_j |b_j|``: how much a step's weights can amplify an error in the predictions it combines (1 for a
    first-order step)."""
    return sum(abs(w) for w in row)


def level_index(sigma: float, levels: Sequence[float]) -> int | None:
    """The index of the level ``sigma`` is (relative tolerance 1e-5), None between levels. The first level also
    matches a σ a little below it: k-diffusion's SDE samplers move a flow model's σ = 1 just inside the valid
    range."""
    for i, level in enumerate(levels):
        if abs(sigma - level) <= 1e-5 * level:
            return i
    return 0 if levels and levels[0] * (1 - 1e-3) <= sigma < levels[0] else None


class CorrectionFilter:
    """Per sampling run: turns the rule's correction ``c_i`` at schedule level σ_i into the one to feed, ``c'_i``,
    so that the sampler's update receives ``W_i c_i`` (module docstring). Levels the sampler skipped or did not
    guide count as ``c' = 0``; a call at a σ that is not a schedule level passes ``c`` unchanged.

    A step whose extrapolation gain ``Σ_j |b_{i,j}|`` exceeds ``max_gain`` is taken at first order, prior
    included, when the predictions of its history are known (``denoised`` given at those levels): the fed
    prediction is chosen so that ``Σ_j b_{i,j} D'_{i−j} = D_i + c_i``, i.e.

        c'_i = (c_i − Σ_{j≥1} b_{i,j} (c'_{i−j} + D_{i−j} − D_i)) / b_{i,0}.

    The predictions a guided run evaluates carry the prior's response to the earlier guided moves, which is not
    smooth along the trajectory; a step that multiplies their differences by a large factor (DPM-Solver++(3M)
    SDE: ``b = (11.2, −20.1, 10.0)`` on the step to σ_min of SD's 20-step normal schedule) turns that response into
    an error of the same factor (bench/README.md, *Every sampler*). Unguided runs never come here.
    """

    def __init__(self, family, sigmas: torch.Tensor | Sequence[float], alpha: AlphaFn | None = None,
                 max_gain: float = MAX_GAIN) -> None:
        self.family = family
        self.sigmas = torch.as_tensor(sigmas, dtype=torch.float64).flatten().tolist()
        self.alpha = alpha or _one
        self.max_gain = max_gain
        self.fed: dict[int, torch.Tensor] = {}
        self.denoised: dict[int, torch.Tensor] = {}
        self.first_order: list[int] = []       # the steps taken at first order

    def index(self, sigma: float) -> int | None:
        """The step whose level is ``sigma`` (None between levels; ``level_index``)."""
        return level_index(sigma, self.sigmas[:-1])

    def far_steps(self) -> list[int]:
        """The steps whose gain exceeds ``max_gain``: taken at first order when guided."""
        return [i for i in range(len(self.sigmas) - 1)
                if gain(self.family.weights(self.sigmas, i, self.alpha)) > self.max_gain]

    def __call__(self, sigma: float, correction: torch.Tensor, denoised: torch.Tensor | None = None) -> torch.Tensor:
        i = self.index(sigma)
        if i is None:
            return correction
        if i == 0:
            self.sigmas[0] = sigma      # the σ the sampler steps from (the flow models' offset first σ)
        self.fed = {j: c for j, c in self.fed.items() if j < i}   # a sampler that starts again forgets
        self.denoised = {j: d for j, d in self.denoised.items() if j < i}
        b = self.family.weights(self.sigmas, i, self.alpha)
        history = range(1, len(b))
        first_order = (denoised is not None and gain(b) > self.max_gain
                       and all(i - j in self.denoised for j in history))
        fed = correction
        for j, weight in enumerate(b[1:], start=1):
            previous = self.fed.get(i - j)
            if previous is not None:
                fed = fed - weight * previous
            if first_order:
                fed = fed - weight * (self.denoised[i - j] - denoised).to(fed.dtype)
        fed = fed / b[0] if b[0] != 1.0 else fed
        self.fed[i] = fed
        if denoised is not None:
            self.denoised[i] = denoised.detach()
        if first_order:
            self.first_order.append(i)
        return fed


@dataclass(frozen=True)
class ProbedFamily:
    """The weights ``b_{i,j}`` of a sampler read off its function by ``probe_family`` for one σ schedule."""

    name: str
    table: tuple[tuple[float, ...], ...]

    @property
    def history(self) -> int:
        return max((len(row) for row in self.table), default=1) - 1

    def weights(self, sigmas: Sequence[float], i: int, alpha: AlphaFn = _one) -> tuple[float, ...]:
        return self.table[i] if 0 <= i < len(self.table) else (1.0,)


class _ProbeModel:
    """The denoiser a probed sampler calls: records (σ, x) and returns the prediction of the call's column."""

    def __init__(self, n: int, attributes: Mapping[str, object]) -> None:
        self.n = n
        self.calls: list[tuple[float, torch.Tensor]] = []
        for key, value in attributes.items():
            setattr(self, key, value)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **kwargs: object) -> torch.Tensor:
        k = len(self.calls)
        self.calls.append((float(torch.as_tensor(sigma).flatten()[0]), x.detach().clone()))
        d = torch.zeros_like(x)
        if k < self.n:
            d[:, k] = 1.0
        return d


def _stable(table: Sequence[Sequence[float]], bound: float = 10.0) -> bool:
    """Whether the filter's recursion c'_i = (c_i − Σ_j b_{i,j} c'_{i−j}) / b_{i,0} stays bounded: its response to
    a unit correction at one level (at up to 16 levels spread over the run) never exceeds ``bound``."""
    n = len(table)
    for start in sorted({round(k * (n - 1) / 15) for k in range(16)} if n > 16 else range(n)):
        fed = [0.0] * n
        for i in range(start, n):
            row = table[i]
            if abs(row[0]) < 1e-6:
                return False
            past = sum(b * fed[i - j] for j, b in enumerate(row[1:], start=1) if i - j >= start)
            fed[i] = ((1.0 if i == start else 0.0) - past) / row[0]
            if not math.isfinite(fed[i]) or abs(fed[i]) > bound:
                return False
    return True


def probe_family(sample: Callable[..., torch.Tensor], sigmas: torch.Tensor | Sequence[float],
                 options: Mapping | None = None, model_attributes: Mapping[str, object] | None = None,
                 name: str = "probed") -> ProbedFamily | None:
    """The weights of the k-diffusion-style sampler ``sample(model, x, sigmas, extra_args=..., callback=...,
    disable=..., **options)`` for the levels ``sigmas``, read off the function (module docstring), or None when it
    is not a linear one-evaluation-per-level sampler. ``model_attributes`` are set on the probe model (ComfyUI's
    samplers read ``model.inner_model``). Runs the sampler on a (1, n + 2, 1, 1) batch: in float64, or in float32
    for a sampler whose own constants are float32 (UniPC)."""
    for dtype, tolerance in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        try:
            table = _probe(sample, sigmas, dict(options or {}), dict(model_attributes or {}), dtype, tolerance)
        except Exception:   # a sampler that needs more of the host than a denoiser (CFG++, adaptive steps, ...)
            continue
        return None if table is None else ProbedFamily(name=name, table=table)
    return None


def _probe(sample: Callable[..., torch.Tensor], sigmas: torch.Tensor | Sequence[float], options: dict,
           attributes: dict, dtype: torch.dtype, tolerance: float) -> tuple[tuple[float, ...], ...] | None:
    levels = [float(v) for v in torch.as_tensor(sigmas).flatten().tolist()]
    n = len(levels) - 1
    if n < 1:
        return None
    model = _ProbeModel(n, attributes)
    x = torch.zeros(1, n + 2, 1, 1, dtype=dtype)
    x[:, n], x[:, n + 1] = 1.0, 2.0               # the start's own path, twice: a check of linearity
    try:
        parameters = inspect.signature(sample).parameters
    except (TypeError, ValueError):
        parameters = {}
    if "noise_sampler" in parameters:
        options["noise_sampler"] = lambda sigma, sigma_next: torch.zeros_like(x)
    with torch.no_grad():   # a copy of the levels: some samplers write into theirs (UniPC's last level)
        final = sample(model, x.clone(), torch.as_tensor(sigmas).to(dtype).clone(), extra_args={"seed": 0},
                       callback=None, disable=True, **options)
    calls = model.calls
    if len(calls) != n or [level_index(s, levels[:-1]) for s, _ in calls] != list(range(n)):
        return None
    states = [c[1].double().flatten() for c in calls] + [torch.as_tensor(final).double().flatten()]
    if any(s.numel() != n + 2 or not torch.isfinite(s).all() for s in states):
        return None
    table = []
    for i in range(n):
        start, nxt = states[i], states[i + 1]
        scale = max(1.0, float(nxt.abs().max()))
        if abs(float(nxt[n + 1] - 2 * nxt[n])) > tolerance * scale:
            return None                                            # noise or a mixing of the columns
        a = float(nxt[n] / start[n]) if abs(float(start[n])) > 1e-30 else 0.0
        w = (nxt[:n] - a * start[:n]).tolist()
        if any(abs(v) > tolerance * scale for v in w[i + 1:]):
            return None                                            # a prediction used before it was made
        total = sum(w[:i + 1])
        if abs(total) < 1e-12:
            table.append((1.0,))
            continue
        row = [w[i - j] / total for j in range(i + 1)]
        while len(row) > 1 and abs(row[-1]) < tolerance:
            row.pop()
        table.append(tuple(row))
    return tuple(table) if _stable(table) else None


def sampler_family(sample: Callable[..., torch.Tensor], sigmas: torch.Tensor | Sequence[float],
                   options: Mapping | None = None, model_attributes: Mapping[str, object] | None = None):
    """The family of the sampler function ``sample`` for the levels ``sigmas``: the written-out one of its name
    (``family_for``), else the weights probed from it (``probe_family``); None when it is neither."""
    name = getattr(sample, "__name__", "")
    family = family_for(name, options)
    if family is not None:
        return family
    base = _base_function(sample)
    return None if base is None else probe_family(base, sigmas, options, model_attributes, name=name)


def _base_function(sample: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor] | None:
    """``sample`` itself, or for a CFG++ sampler its base sampler's function from the same module (k-diffusion's
    ``sample_<base>``); None when there is none."""
    name = getattr(sample, "__name__", "")
    if not name.endswith(CFG_PP):
        return sample
    module = sys.modules.get(getattr(sample, "__module__", None) or "")
    base = base_sampler(name)
    found = getattr(module, f"sample_{base}", None) or getattr(module, base, None)
    return found if callable(found) else None


# Samplers that evaluate the model more than once per step, k-diffusion's names: Heun (the second evaluation at
# σ_{i+1}), DPM-2 (at the log-midpoint σ_m) and DPM-Solver-fast (steps of its own, of 3, 2 or 1 evaluations;
# ``dpm_fast_function`` is ComfyUI's wrapper of ``sample_dpm_fast``). Heun++ (a third evaluation at σ_{i+2}, ad
# hoc weights) and the ancestral two-stage samplers keep a correction per evaluation (bench/README.md).
STAGED = {"heun": "heun", "dpm_2": "dpm_2", "dpm_fast": "dpm_fast", "dpm_fast_function": "dpm_fast"}


def dpm_fast_steps(sigmas: Sequence[float]) -> list[tuple[float, float, int]]:
    """The steps (σ from, σ to, order) of DPM-Solver-fast (Lu et al. 2022, arXiv 2206.00927, §3.4; k-diffusion's
    ``DPMSolver.dpm_solver_fast`` with η = 0) run for the ``n = len(sigmas) − 1`` evaluations of a schedule from
    ``sigmas[0]`` to its smallest positive σ, as both hosts run it: ``m = ⌊n/3⌋ + 1`` steps evenly spaced in
    ``t = −log σ``, of orders 3, ..., 3 then 2, 1 (n divisible by 3) or n mod 3."""
    positive = [s for s in sigmas if s > 0]
    n = len(sigmas) - 1
    m = n // 3 + 1
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    t_start, t_end = -math.log(positive[0]), -math.log(positive[-1])
    ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
    return [(math.exp(-ts[k]), math.exp(-ts[k + 1]), order) for k, order in enumerate(orders)]


class StageClock:
    """Per sampling run of a sampler with several evaluations per step (``STAGED``): the step's correction is
    computed at its first evaluation but fed, rescaled, to its last one alone, so that the guided step is the
    sampler's own step of the prior plus Euler's step of the correction.

    Why: a correction fed to the first evaluation moves the points of the later ones, whose predictions then
    respond to the move in a way nothing controls, and the later slopes' factors (Heun: ``1/σ_{i+1}``, DPM-2:
    ``1/σ_m``) are large in the last steps where σ falls fastest: a correction recomputed there, or held, is
    amplified or reversed (Heun, with predictions that ignore x: ``Δσ/2 (−2c_1/σ_i + (c_1 − c_2)/σ_{i+1})``).
    Fed to the last evaluation only, ``c_last = s c`` enters the step linearly, so ``s`` is chosen to make its
    part ``(1 − σ_{i+1}/σ_i) c``, Euler's step, which the rules are tuned for, whatever the prediction does:

    * Heun, ``x_{i+1} = x_i + Δσ (d_1 + d_2)/2`` with ``d = (x − D')/σ``: part ``−Δσ/2 · c_2/σ_{i+1}``, so
      ``s = 2σ_{i+1}/σ_i``;
    * DPM-2, ``x_{i+1} = x_i + Δσ d_m``: part ``−Δσ c_m/σ_m``, so ``s = σ_m/σ_i``;
    * DPM-Solver-fast in ``t = −log σ``, ``h = t_{i+1} − t_i``, with ``ε' = ε − c/σ``: its 2nd-order step
      (``r_1 = 1/2``) puts ``σ_{i+1}/(2r_1) (e^h − 1) c_1/σ_{s_1}`` on x, so ``s = σ_{s_1}/σ_i``; its 3rd-order step
      (``r_2 = 2/3``) ``σ_{i+1}/r_2 · ((e^h − 1)/h − 1) c_2/σ_{s_2}``, so ``s = r_2 σ_{s_2}(e^h − 1)/(σ_i ((e^h −
      1)/h − 1))``; its first-order step (DDIM's) has one evaluation.

    A step to σ = 0 has one evaluation (Euler's), which gets ``c`` itself. ``later_stage`` tells a step's later
    evaluations: Heun's are below the evaluation just before them (the next step starts again at the level the
    predictor reached), DPM-2's lie between the schedule's levels, DPM-Solver-fast's between its own steps.
    """

    def __init__(self, kind: str, sigmas: torch.Tensor | Sequence[float]) -> None:
        if kind not in set(STAGED.values()):
            raise ValueError(f"kind must be one of {sorted(set(STAGED.values()))}, got {kind!r}")
        self.kind = kind
        self.levels = [float(s) for s in torch.as_tensor(sigmas).flatten().tolist()]
        self.steps = dpm_fast_steps(self.levels) if kind == "dpm_fast" else None
        self.starts = [start for start, _, _ in self.steps] if self.steps else self.levels[:-1]
        self.previous: float | None = None
        self.start: float | None = None            # σ of the current step's first evaluation
        self.step: tuple[float, int] | None = None  # (σ it ends at, its evaluations); None off the levels
        self.stage = 0                             # evaluations of the current step so far, minus one
        self.correction: torch.Tensor | None = None
        self.start_x: torch.Tensor | None = None    # x at the current step's first evaluation (``final_output``)

    def later_stage(self, sigma: float, x: torch.Tensor | None = None) -> bool:
        """Whether the evaluation at ``sigma`` (of the point ``x``, optional) is a later one of the current step
        (call once per evaluation, in order); at a step's first evaluation the last step's correction is dropped
        and ``x`` kept as the step's start."""
        previous, self.previous = self.previous, sigma
        if self.kind == "heun":
            later = previous is not None and sigma < previous * (1 - 1e-5)
        else:
            later = level_index(sigma, self.starts) is None and previous is not None
        if later:
            self.stage += 1
        else:
            self.start, self.step, self.stage, self.correction = sigma, self._step_from(sigma), 0, None
            self.start_x = None if x is None else x.detach()
        return later

    def final_output(self, sigma: float, x: torch.Tensor) -> tuple[torch.Tensor, float] | None:
        """DPM-Solver-fast's last step ends at the schedule's smallest positive σ, and the sampler returns the x it
        reaches there, not a prediction (every other sampler's last step, to σ = 0, returns its prediction). At
        that step's last evaluation (at ``sigma``, of the point ``x``) the step's result is linear in this
        evaluation's prediction D: ``x_end = x_start − gain·(x − D) = base + gain·D`` with ``gain = Δσ/σ``
        (k-diffusion's ``DPMSolver``, ε = (x − D)/σ and ``σ_next(e^h − 1) = Δσ``: its first-order step, DDIM's,
        is ``x_start − Δσ ε(x_start)``, its second-order step (r₁ = 1/2) ``x_start − Δσ ε(u₁)`` with u₁ the point
        of its second evaluation; the last step is never of order 3, ``dpm_fast_steps``). Returns ``(base, gain)``
        there; None at any other evaluation, for Heun and DPM-2, and when ``later_stage`` was not given the
        step's start."""
        if self.steps is None or self.step is None or self.start_x is None or self.start is None:
            return None
        end, evaluations = self.step
        if self.stage != evaluations - 1 or level_index(self.start, self.starts) != len(self.steps) - 1 or end <= 0:
            return None
        gain = (self.start - end) / sigma
        return self.start_x.to(x) - gain * x, gain

    def _step_from(self, sigma: float) -> tuple[float, int] | None:
        """(σ the step from ``sigma`` ends at, its number of evaluations); None off the levels."""
        i = level_index(sigma, self.starts)
        if i is None:
            return None
        if self.steps is not None:
            return self.steps[i][1], self.steps[i][2]
        end = self.levels[i + 1]
        return end, (2 if end > 0 else 1)

    def step_size(self, sigma: float) -> float | None:
        """``σ − σ_end`` of the step whose first evaluation is at ``sigma`` (after ``later_stage(sigma)``), None
        when no step starts there. DPM-Solver-fast's steps span several schedule levels: a rule sized for one
        level's Δσ would be applied over three (Euler's step of the correction, class docstring)."""
        if self.step is None or self.start != sigma or self.stage != 0:
            return None
        return sigma - self.step[0]

    def first_feed(self, correction: torch.Tensor) -> torch.Tensor:
        """What the step's first evaluation adds to its prediction: nothing when later evaluations follow
        (``correction`` is kept for the last one), else ``correction``."""
        if self.step is None or self.step[1] == 1:
            return correction
        self.correction = correction
        return torch.zeros_like(correction)

    def later_feed(self, sigma: float) -> torch.Tensor | None:
        """What a later evaluation at ``sigma`` adds: the kept correction rescaled at the step's last evaluation
        (class docstring), nothing before it; None when the step's first evaluation was not guided."""
        if self.correction is None or self.step is None:
            return None
        end, evaluations = self.step
        if self.stage < evaluations - 1:
            return torch.zeros_like(self.correction)
        if self.kind == "heun":
            scale = 2 * sigma / self.start
        elif self.kind == "dpm_2" or evaluations == 2:
            scale = sigma / self.start
        else:
            h = math.log(self.start / end)
            scale = (2 / 3) * sigma * math.expm1(h) / (self.start * (math.expm1(h) / h - 1))
        return self.correction * scale


def stage_clock(sample: Callable[..., torch.Tensor] | str, sigmas: torch.Tensor | Sequence[float],
                options: Mapping | None = None) -> StageClock | None:
    """The ``StageClock`` of the sampler function (or k-diffusion name) ``sample`` with ``options`` (eta); None for
    a sampler with one evaluation per step, or one whose stages are not known here."""
    name = base_sampler(sample if isinstance(sample, str) else getattr(sample, "__name__", ""))
    if name not in STAGED or float((options or {}).get("eta", 0.0) or 0.0) != 0.0:
        return None     # DPM-Solver-fast with η > 0 (the WebUI's default eta) takes other steps
    return StageClock(STAGED[name], sigmas)
