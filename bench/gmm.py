"""Posterior accuracy on the Gaussian-mixture benchmark (MCG-Diff protocol), against the exact posterior.

    python bench/gmm.py [--quick] [--json] [--steps 100] [--sweep-steps 100,1000] [--dims 8,80,800] [--dim-y 1,2,4] [--seeds 3]
    ../peers-venv/bin/python bench/gmm.py ...      # the same, with deepinv's DPS (bench/requirements-peers.txt)

Problems (``dps.app.gmm``; the MCG-Diff protocol: Cardoso, Janati, Le Corff, Moulines, ICLR 2024, code
gabrielvc/mcg_diff ``scripts/viz_gaussian.py``): a 25-component unit-covariance mixture with randn² weights
in d_x dimensions, a d_y x d_x operator with U(0, 1) singular values, y = A x* + σ_y n with σ_y = U(0, 1)·max(s)
(floored at 0.05), x* drawn from the prior. The exact posterior is a mixture too (``GaussianMixture.posterior``).

Samplers, all on the same analytic ε (``mixture_eps``, equal to ``GaussianMixture.eps`` but O(B·K·d) instead
of materialising (B, K, d)), the same DDPM linear schedule, the same step count and the same seeds:

* ``unconditional``: ``ddpm_sample`` without guidance (the ceiling any guidance must get under);
* ``dps``, ``dps_paper``, ``schedule``, ``polyak``: ``DPSGuidance`` with each step rule, mode "full";
* ``schedule_x0_only``: the "schedule" rule in mode "x0_only" (sigma_data = the prior's standard deviation);
* ``deepinv_dps``: ``deepinv.sampling.DPS`` (DDPM solver, VP schedule β ∈ [0.1, 20] = DDPM's linear β) with the
  same ε wrapped as a deepinv denoiser D(x, σ) (x = x0 + σ n; ᾱ = 1/(1 + σ²)), only when deepinv imports;
* ``exact``: a second draw of exact posterior samples, the metric's noise floor.

ζ: the sweep (d_x = 8, problems with seeds from 100 on, never reported in the main table) scores every ζ of
each rule at each step count; the main table uses each rule's best ζ at that step count. Metrics: sliced
Wasserstein-2 (``--slices``, default 1000 random directions) and max-sliced W2 over 100 directions (benchopt's
protocol) between ``--samples`` sampler draws and ``--reference`` exact draws.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps import (RULES, DPSGuidance, Gaussian, GuidanceDivergedError, alphas_cumprod_from_betas,  # noqa: E402
                 ddpm_sample, linear_betas)
from dps.app import GaussianMixture, MatrixOperator, as_image, random_problem  # noqa: E402
from dps.rules import get_rule  # noqa: E402
from bench.machine import environment  # noqa: E402

AC = alphas_cumprod_from_betas(linear_betas())
# ζ grids of the sweep ("dps_paper" ζ' is "dps" with ζ = 2ζ'; deepinv's weight plays the role of "schedule"'s ζ).
ZETAS = {
    "dps": (0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
    "dps_paper": (0.005, 0.015, 0.05, 0.15, 0.5, 1.5),
    "schedule": (0.3, 1.0, 2.0, 3.0, 10.0, 30.0),
    "polyak": (0.1, 0.3, 1.0, 2.0, 3.0, 10.0),
    "schedule_x0_only": (0.3, 1.0, 2.0, 3.0, 10.0, 30.0),
    "deepinv_dps": (0.3, 1.0, 2.0, 3.0, 10.0, 30.0),
}
QUICK_ZETAS = {
    "dps": (0.03, 0.3), "dps_paper": (0.015, 0.15), "schedule": (1.0, 3.0), "polyak": (0.3, 1.0), "schedule_x0_only": (1.0, 3.0),
    "deepinv_dps": (1.0, 3.0),
}
TUNING_SEED = 100

try:  # deepinv is optional (bench/requirements-peers.txt); everything else runs without it
    import deepinv as dinv
    DEEPINV = getattr(dinv, "__version__", None) or "unknown"
    DEEPINV_ERROR = None
except Exception as exc:  # noqa: BLE001  (torchvision mismatches raise RuntimeError/OSError, not ImportError)
    dinv = None
    DEEPINV = None
    DEEPINV_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def mixture_eps(prior: GaussianMixture):
    """``eps(x_t, alpha_cumprod)`` equal to ``prior.eps`` (the analytic ε of the diffused mixture), computed
    through ``x·μ_k`` products: logits_k = log w_k + √ᾱ x·μ_k − ᾱ‖μ_k‖²/2, ∇log p_t = √ᾱ Σ r_k μ_k − x."""
    means = prior.means.double()
    sq = means.square().sum(1)
    logw = prior.weights.double().log()

    def eps(x_t: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
        x = x_t.flatten(1).double()
        ac = alpha_cumprod.double().reshape(-1, 1).expand(x.shape[0], 1)
        s = ac.sqrt()
        logits = logw[None] + s * (x @ means.T) - 0.5 * ac * sq[None]
        score = s * (logits.softmax(1) @ means) - x
        return (-(1 - ac).sqrt() * score).to(x_t.dtype).view_as(x_t)

    return eps


def make_problem(dim_x: int, dim_y: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    prior = GaussianMixture.mcg_diff(dim_x, g)
    a = random_problem(dim_x, dim_y, g)
    x_star = prior.sample(1, g)[0]
    sigma_y = max(0.05, float(torch.rand((), generator=g, dtype=torch.float64)) * float(torch.linalg.svdvals(a).max()))
    y = a @ x_star + sigma_y * torch.randn(dim_y, generator=g, dtype=torch.float64)
    return prior, a, y, sigma_y


def prior_std(prior: GaussianMixture) -> float:
    """Root-mean over coordinates of the prior's variance (1 + the weighted variance of the means)."""
    w = prior.weights.double()[:, None]
    mean = (w * prior.means).sum(0)
    var = 1 + (w * (prior.means - mean).square()).sum(0)
    return float(var.mean().sqrt())


def run_ours(method: str, zeta: float, prior, a, y, sigma_y, steps: int, n: int, seed: int) -> torch.Tensor:
    eps = mixture_eps(prior)
    model = lambda x, t: eps(x, AC[t])  # noqa: E731
    guidance = None
    if method != "unconditional":
        rule, mode = ("schedule", "x0_only") if method == "schedule_x0_only" else (method, "full")
        guidance = DPSGuidance(MatrixOperator(a), Gaussian(sigma_y), as_image(y[None]), zeta=zeta, rule=rule,
                               mode=mode, sigma_data=prior_std(prior))
    return ddpm_sample(model, (n, prior.dim, 1, 1), steps=steps, guidance=guidance, clip_x0=False,
                       generator=torch.Generator().manual_seed(seed)).flatten(1)


def run_deepinv(weight: float, prior, a, y, sigma_y, steps: int, n: int, seed: int) -> torch.Tensor:
    """deepinv's DPS around the same analytic ε. deepinv's denoiser convention is D(x, σ) with x = x0 + σ n
    (its VP state divided by the scale √ᾱ), so ᾱ = 1/(1 + σ²), x_t = √ᾱ x and D = x − σ ε(x_t, ᾱ).
    ``minus_one_one=False`` keeps the mixture's own coordinates (deepinv would otherwise map [-1, 1] to [0, 1]
    for the denoiser), and the data-fidelity clip to [-1, 1] is lifted as our samplers' ``clip_x0=False``.
    Its DDPM solver takes ``num_steps`` time points on [1, 0] and evaluates the score at all but the last, so
    ``num_steps = steps + 1`` gives the same number of steps as ``ddpm_sample(steps=steps)``."""
    eps = mixture_eps(prior)

    class MixtureDenoiser(dinv.models.Denoiser):
        def forward(self, x, sigma, *args, **kwargs):
            s = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).flatten()
            s = s.expand(x.shape[0]) if s.numel() == 1 else s
            ac = 1 / (1 + s.square())
            e = eps(x.double() * ac.sqrt().view(-1, 1, 1, 1), ac)
            return (x.double() - s.view(-1, 1, 1, 1) * e).to(x.dtype)

    m = a.double()
    physics = dinv.physics.LinearPhysics(A=lambda x: torch.einsum("yx,bxhw->byhw", m.to(x.dtype), x),
                                         A_adjoint=lambda v: torch.einsum("yx,byhw->bxhw", m.to(v.dtype), v))
    model = dinv.sampling.DPS(MixtureDenoiser(), schedule="vp", solver="ddpm", num_steps=steps + 1, weight=weight,
                              rng=torch.Generator().manual_seed(seed), minus_one_one=False, dtype=torch.float64)
    model.data_fidelity.clip = None
    with torch.no_grad():
        out = model(as_image(y[None]).double(), physics, x_init=(n, prior.dim, 1, 1), seed=seed)
    return out.flatten(1).double()


class Reference:
    """Exact posterior draws with their sorted projections, computed once per problem: the distances equal
    ``dps.app.sliced_wasserstein(samples, exact, slices, Generator().manual_seed(2))`` and
    ``max_sliced_wasserstein(samples, exact, 100, Generator().manual_seed(3))`` (checked in tests/test_bench.py)
    without re-sorting the reference for every sampler run."""

    def __init__(self, exact: torch.Tensor, slices: int) -> None:
        self.exact = exact.flatten(1).double()
        self.thetas = [_directions(self.exact.shape[1], slices, 2), _directions(self.exact.shape[1], 100, 3)]
        self.sorted = [(self.exact @ th.T).sort(dim=0).values for th in self.thetas]

    def _w2_squared(self, samples: torch.Tensor, k: int) -> torch.Tensor:
        pa, pb = (samples @ self.thetas[k].T).sort(dim=0).values, self.sorted[k]
        n = min(len(pa), len(pb))
        levels = (torch.arange(n, dtype=pa.dtype) + 0.5) / n
        qa = pa[(levels * len(pa)).long().clamp(max=len(pa) - 1)]
        qb = pb[(levels * len(pb)).long().clamp(max=len(pb) - 1)]
        return (qa - qb).square().mean(0)

    def score(self, samples: torch.Tensor) -> dict:
        samples = samples.flatten(1).double().cpu()
        if not torch.isfinite(samples).all():
            return {"sw": None, "max_sw": None}
        return {"sw": float(self._w2_squared(samples, 0).mean().sqrt()),
                "max_sw": float(self._w2_squared(samples, 1).max().sqrt())}


def _directions(dim: int, n: int, seed: int) -> torch.Tensor:
    theta = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return theta / theta.norm(dim=1, keepdim=True)


def reference(problem, n_ref: int, slices: int) -> Reference:
    prior, a, y, sigma_y = problem
    return Reference(prior.posterior(a, y, sigma_y).sample(n_ref, torch.Generator().manual_seed(1)), slices)


def run_method(method: str, zeta: float | None, problem, ref: Reference, steps: int, n: int, seed: int) -> dict:
    prior, a, y, sigma_y = problem
    t0 = time.perf_counter()
    try:
        if method == "exact":
            samples = prior.posterior(a, y, sigma_y).sample(n, torch.Generator().manual_seed(seed + 7))
        elif method == "deepinv_dps":
            samples = run_deepinv(zeta, prior, a, y, sigma_y, steps, n, seed)
        else:
            samples = run_ours(method, zeta or 0.0, prior, a, y, sigma_y, steps, n, seed)
        out = ref.score(samples)
        out["diverged"] = out["sw"] is None
    except GuidanceDivergedError:
        out = {"sw": None, "max_sw": None, "diverged": True}
    out["seconds"] = round(time.perf_counter() - t0, 3)
    return out


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def methods(with_deepinv: bool) -> list[str]:
    """The gradient rules (the data step ``proximal`` is measured by few_steps.py and host_defaults.py), the x0-only
    variant and deepinv's DPS when importable."""
    gradient_rules = [r for r in RULES if get_rule(r).differentiates]
    return gradient_rules + ["schedule_x0_only"] + (["deepinv_dps"] if with_deepinv else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced grid (d_x 8, d_y 1 and 4, one seed, 100 steps)")
    p.add_argument("--show", metavar="FILE", help="print the tables of a saved --json output and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--steps", help="step counts of the main grid, comma-separated (default 100; quick 100); each\n"
                   "must be one of the sweep's, whose best ζ it uses")
    p.add_argument("--sweep-steps", help="step counts of the ζ sweep at d_x = 8 (default 100,1000; quick 100)")
    p.add_argument("--dims", help="d_x values (default 8,80,800; quick 8)")
    p.add_argument("--dim-y", help="d_y values (default 1,2,4; quick 1,4)")
    p.add_argument("--seeds", type=int, help="problems per (d_x, d_y) cell (default 3; quick 1)")
    p.add_argument("--tuning-seeds", type=int, help="problems per d_y in the ζ sweep (default 2; quick 1)")
    p.add_argument("--samples", type=int, help="sampler draws per run (default 1000; quick 500)")
    p.add_argument("--reference", type=int, help="exact posterior draws (default 10000; quick 2000)")
    p.add_argument("--slices", type=int, default=1000, help="sliced-W directions (default 1000)")
    p.add_argument("--no-deepinv", action="store_true", help="skip deepinv even when it imports")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.show:
        print_tables(json.loads(Path(args.show).read_text()))
        return 0
    torch.set_num_threads(args.threads)
    q = args.quick
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    steps_list = ints(args.steps or "100")
    sweep_steps = ints(args.sweep_steps or ("100" if q else "100,1000"))
    sweep_steps += [s for s in steps_list if s not in sweep_steps]
    dims = ints(args.dims or ("8" if q else "8,80,800"))
    dims_y = ints(args.dim_y or ("1,4" if q else "1,2,4"))
    seeds = args.seeds or (1 if q else 3)
    tuning_seeds = args.tuning_seeds or (1 if q else 2)
    n = args.samples or (500 if q else 1000)
    n_ref = args.reference or (2000 if q else 10000)
    with_deepinv = DEEPINV is not None and not args.no_deepinv
    grid = QUICK_ZETAS if q else ZETAS
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    start = time.perf_counter()
    if DEEPINV is None:
        log(f"deepinv: not importable ({DEEPINV_ERROR}); its DPS is left out. Install bench/requirements-peers.txt "
            "in a separate environment to include it.")
    else:
        log(f"deepinv {DEEPINV}: {'included' if with_deepinv else 'skipped (--no-deepinv)'}")

    # 1. ζ sweep per rule and step count, on tuning problems (d_x = 8)
    sweep = []
    tuning = [make_problem(8, dy, TUNING_SEED + 10 * dy + s) for dy in dims_y for s in range(tuning_seeds)]
    tuning_refs = [reference(pr, n_ref, args.slices) for pr in tuning]
    for steps in sweep_steps:
        for method in methods(with_deepinv):
            for zeta in grid[method]:
                runs = [run_method(method, zeta, pr, ref, steps, n, seed=0) for pr, ref in zip(tuning, tuning_refs)]
                row = {"method": method, "steps": steps, "zeta": zeta, "sw": mean([r["sw"] for r in runs]),
                       "max_sw": mean([r["max_sw"] for r in runs]), "diverged": sum(r["diverged"] for r in runs)}
                sweep.append(row)
                log(f"sweep steps={steps:5d} {method:17s} zeta={zeta:<6g} SW={_f(row['sw'])}  "
                    f"max-SW={_f(row['max_sw'])}  diverged={row['diverged']}/{len(runs)}")
    best: dict[str, dict[str, float]] = {}
    for method in methods(with_deepinv):
        best[method] = {}
        for steps in sweep_steps:
            rows = [r for r in sweep if r["method"] == method and r["steps"] == steps and r["sw"] is not None
                    and r["diverged"] == 0]
            if rows:
                best[method][str(steps)] = min(rows, key=lambda r: r["sw"])["zeta"]

    # 2. main grid on the reported problems, each rule at its best ζ
    results = []
    for dx in dims:
        for dy in dims_y:
            for s in range(seeds):
                problem = make_problem(dx, dy, s)
                ref = reference(problem, n_ref, args.slices)
                for steps in steps_list:
                    for method in ["exact", "unconditional"] + methods(with_deepinv):
                        zeta = best.get(method, {}).get(str(steps))
                        if method not in ("exact", "unconditional") and zeta is None:
                            continue
                        r = run_method(method, zeta, problem, ref, steps, n, seed=s)
                        results.append({"dim_x": dx, "dim_y": dy, "seed": s, "sigma_y": round(problem[3], 4),
                                        "steps": steps, "method": method, "zeta": zeta, **r})
                log(f"d_x={dx} d_y={dy} seed={s} done ({time.perf_counter() - start:.0f} s)")

    summary = summarise(results, steps_list, with_deepinv)
    out = {
        "benchmark": "gmm", "quick": q,
        "config": {"steps": steps_list, "sweep_steps": sweep_steps, "dims": dims, "dims_y": dims_y, "seeds": seeds, "tuning_seeds": tuning_seeds,
                   "tuning_dim_x": 8, "samples": n, "reference": n_ref, "slices": args.slices,
                   "max_sw_projections": 100, "sampler": "ddpm (ancestral), linear betas 1e-4..0.02, respaced",
                   "sigma_y": "max(0.05, U(0,1) * max singular value)", "zeta_grid": {k: list(grid[k])
                                                                                     for k in methods(with_deepinv)}},
        "environment": environment(args.threads),
        "deepinv": {"version": DEEPINV, "included": with_deepinv, "error": DEEPINV_ERROR},
        "sweep": sweep, "best_zeta": best, "results": results, "summary": summary,
        "seconds": round(time.perf_counter() - start, 1),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print_tables(out)
    return 0


def summarise(results: list[dict], steps_list: list[int], with_deepinv: bool) -> dict:
    """Per step count and method: mean SW / max-SW over all problems, and per (d_x, d_y) cell."""
    summary: dict = {}
    all_methods = ["exact", "unconditional"] + methods(with_deepinv)
    for steps in steps_list:
        rows = [r for r in results if r["steps"] == steps]
        cells = sorted({(r["dim_x"], r["dim_y"]) for r in rows})
        per = {}
        for m in all_methods:
            mr = [r for r in rows if r["method"] == m]
            if not mr:
                continue
            per[m] = {"sw": mean([r["sw"] for r in mr]), "max_sw": mean([r["max_sw"] for r in mr]),
                      "zeta": mr[0]["zeta"], "diverged": sum(r["diverged"] for r in mr),
                      "cells": {f"{dx},{dy}": {"sw": mean([r["sw"] for r in mr if (r["dim_x"], r["dim_y"]) == (dx, dy)]),
                                               "max_sw": mean([r["max_sw"] for r in mr
                                                               if (r["dim_x"], r["dim_y"]) == (dx, dy)])}
                                for dx, dy in cells}}
        if "deepinv_dps" in per:  # how many (d_x, d_y) cells each of ours is at least as close as deepinv's
            for m in methods(False):
                if m in per:
                    per[m]["cells_at_least_as_close_as_deepinv"] = sum(
                        (per[m]["cells"][c]["sw"] or math.inf) <= (per["deepinv_dps"]["cells"][c]["sw"] or math.inf)
                        for c in per[m]["cells"])
        summary[str(steps)] = per
    return summary


def _f(v: float | None, width: int = 6) -> str:
    return f"{v:{width}.2f}" if v is not None and math.isfinite(v) else f"{'-':>{width}}"


def print_tables(out: dict) -> None:
    env = out["environment"]
    print(f"\nGaussian-mixture benchmark: {env['processor']} ({env['cpus']} CPUs, {env['threads']} thread), "
          f"torch {env['torch']}, deepinv {out['deepinv']['version'] or 'absent'}; {out['seconds']} s")
    print("\nζ sweep (d_x = 8, tuning problems): mean sliced W2 per ζ")
    for steps in out["config"]["sweep_steps"]:
        for method, zetas in out["config"]["zeta_grid"].items():
            cells = []
            for z in zetas:
                r = next(r for r in out["sweep"] if r["method"] == method and r["steps"] == steps and r["zeta"] == z)
                mark = "*" if out["best_zeta"].get(method, {}).get(str(steps)) == z else " "
                cells.append(f"{z:g}:{_f(r['sw'], 5).strip() if not r['diverged'] else 'div'}{mark}")
            print(f"  steps={steps:5d} {method:17s} " + "  ".join(cells))
    for steps, per in out["summary"].items():
        cells = list(next(iter(per.values()))["cells"])
        print(f"\n{steps} steps: sliced W2 (max-sliced W2) to exact posterior samples, mean over "
              f"{out['config']['seeds']} problems per cell")
        print(f"  {'method':17s} {'ζ':>6s}  " + "  ".join(f"{'dx,dy=' + c:>16s}" for c in cells) + f"  {'mean':>16s}")
        for m, v in per.items():
            z = f"{v['zeta']:g}" if v["zeta"] is not None else ""
            row = "  ".join(f"{_f(v['cells'][c]['sw'])} ({_f(v['cells'][c]['max_sw'], 6).strip():>6s})"
                            for c in cells)
            vs = v.get("cells_at_least_as_close_as_deepinv")
            vs = f"  <= deepinv in {vs}/{len(cells)} cells" if vs is not None else ""
            print(f"  {m:17s} {z:>6s}  {row}  {_f(v['sw'])} ({_f(v['max_sw']).strip():>6s}){vs}")


if __name__ == "__main__":
    sys.exit(main())
