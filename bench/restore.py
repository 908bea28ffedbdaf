"""Restoration quality of the demo tasks with the embedded priors: DPS against baselines, unguided sampling and
deepinv's DPS around the same prior, and quality against the number of steps.

    python bench/restore.py [--json] [--kinds pixel,latent] [--steps 50] [--images 4] [--tasks ...]
    python bench/restore.py --steps 50,100,250,1000 --images 16          # quality vs steps (slow on a CPU)
    ../peers-venv/bin/python bench/restore.py ...                        # adds deepinv's DPS

Set-up as ``python -m dps demo`` (``dps.app.demo``): held-out digits 0..images-1 (28x28 for the pixel prior,
64x64 RGB through TAESD for the latent prior), y = A(x) + n with Gaussian σ = 0.05 on [-1, 1], the operators
of ``dps.app.tasks``, DDPM respaced to each step count, the demo's tuned (rule, ζ) per task and prior. Columns:

* ``dps``: ``dps.app.sample`` with ``DPSGuidance`` (mode "full");
* ``baseline``: the best, by PSNR against the truth, of ``dps.app.candidates`` (an oracle choice);
* ``unguided``: the prior's samples from the same seed (what the prior alone gives);
* ``deepinv_dps``: ``deepinv.sampling.DPS`` (DDPM solver, VP schedule, ``steps + 1`` time points = ``steps``
  network evaluations) with the same ε-model wrapped as a deepinv denoiser D(x, σ): ᾱ = 1/(1 + σ²), the
  fractional training timestep t with ᾱ_t = ᾱ (interpolated in log σ; the UNet's sinusoidal embedding takes
  real t), D = x − σ ε(√ᾱ x, t). Its weight multiplies a score term that the SDE solver scales by β(t)·dt, so
  ``--deepinv-weight auto`` sets weight = ζ · steps / 10, which matches the constant-ζ "dps" step at the
  middle of the trajectory (β(0.5) ≈ 10 for deepinv's β ∈ [0.1, 20]); pass numbers to try others.

PSNR (dB) and SSIM are on [-1, 1] images (data range 2), averaged over the images.
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

from dps import (DPSGuidance, Gaussian, GuidanceDivergedError, LinearOperator, alphas_cumprod_from_betas,  # noqa: E402
                 linear_betas)
from dps.app import GUIDANCE, TASKS, DemoSettings, candidates, load_setup, measure, psnr, sample, ssim  # noqa: E402
from bench.machine import environment  # noqa: E402

TAESD = Path(__file__).resolve().parents[2] / "shared" / "assets" / "taesd" / "taesd_decoder.safetensors"  # ../shared
AC = alphas_cumprod_from_betas(linear_betas())

try:  # optional peer (bench/requirements-peers.txt)
    import deepinv as dinv
    DEEPINV = getattr(dinv, "__version__", None) or "unknown"
    DEEPINV_ERROR = None
except Exception as exc:  # noqa: BLE001
    dinv = None
    DEEPINV = None
    DEEPINV_ERROR = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def timestep_for_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The fractional training timestep whose σ_t = √((1 − ᾱ_t)/ᾱ_t) equals ``sigma`` (linear in log σ)."""
    log_sigmas = (((1 - AC) / AC).sqrt()).log().float()
    ls = sigma.float().clamp(min=math.exp(float(log_sigmas[0])), max=math.exp(float(log_sigmas[-1]))).log()
    idx = torch.searchsorted(log_sigmas, ls).clamp(1, len(log_sigmas) - 1)
    lo, hi = log_sigmas[idx - 1], log_sigmas[idx]
    return (idx - 1).float() + (ls - lo) / (hi - lo)


def deepinv_dps(setup, s: DemoSettings, op, y: torch.Tensor, weight: float) -> torch.Tensor:
    """deepinv's DPS with the prior's ε-model as its denoiser; returns images in [-1, 1]."""
    eps_model = setup.prior.eps_model()

    class PriorDenoiser(dinv.models.Denoiser):
        def forward(self, x, sigma, *args, **kwargs):
            sig = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).flatten()
            sig = sig.expand(x.shape[0]) if sig.numel() == 1 else sig
            ac = 1 / (1 + sig.square())
            view = (-1,) + (1,) * (x.ndim - 1)
            e = eps_model(x.float() * ac.sqrt().view(view), timestep_for_sigma(sig))
            return (x.float() - sig.view(view) * e).to(x.dtype)

    decode = setup.decoder if setup.decoder is not None else (lambda z: z)
    forward = lambda z: op(decode(z.float()))  # noqa: E731
    if isinstance(op, LinearOperator) and setup.decoder is None:
        physics = dinv.physics.LinearPhysics(A=forward, A_adjoint=lambda v: op.adjoint(v.float()))
    else:
        physics = dinv.physics.Physics(A=forward)
    model = dinv.sampling.DPS(PriorDenoiser(), schedule="vp", solver="ddpm", num_steps=s.steps + 1, weight=weight,
                              rng=torch.Generator().manual_seed(s.seed + 1), minus_one_one=False,
                              dtype=torch.float32)
    if setup.decoder is not None:
        model.data_fidelity.clip = None  # latents are not in [-1, 1] (our latent sampling does not clip either)
    shape = (len(setup.truth), *setup.prior.shape)
    with torch.no_grad():
        z = model(y, physics, x_init=shape, seed=s.seed + 1)
        return decode(z.float()).clamp(-1, 1)


def scores(x: torch.Tensor, truth: torch.Tensor) -> dict:
    if not torch.isfinite(x).all():
        return {"psnr": None, "ssim": None}
    return {"psnr": float(psnr(x, truth).mean()), "ssim": float(ssim(x, truth).mean())}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", metavar="FILE", help="print the tables of a saved --json output and exit")
    p.add_argument("--json", action="store_true")
    p.add_argument("--kinds", default="pixel,latent", help="priors to run (default pixel,latent)")
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--steps", default="50", help="comma-separated DDPM step counts (default 50; e.g. 50,100,250,1000)")
    p.add_argument("--images", type=int, default=4, help="held-out digits (default 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pixel-model", help="pixel prior file (default: the bundled one)")
    p.add_argument("--latent-model", help="latent prior file (default: the bundled one)")
    p.add_argument("--vae", default=str(TAESD) if TAESD.is_file() else None, help="TAESD decoder for the latent prior")
    p.add_argument("--rule", help="override the demo's rule for every task (dps, dps_paper, schedule)")
    p.add_argument("--zeta", type=float, help="override the demo's zeta for every task")
    p.add_argument("--deepinv-weight", default="auto", help="deepinv DPS weight(s), comma-separated, or 'auto'")
    p.add_argument("--no-deepinv", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return 0
    torch.set_num_threads(args.threads)
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    with_deepinv = DEEPINV is not None and not args.no_deepinv
    if DEEPINV is None:
        log(f"deepinv: not importable ({DEEPINV_ERROR}); its DPS is left out (bench/requirements-peers.txt).")
    steps_list = [int(v) for v in args.steps.split(",")]
    start = time.perf_counter()
    rows = []
    for kind in args.kinds.split(","):
        latent = kind == "latent"
        model = args.latent_model if latent else args.pixel_model
        base = DemoSettings(images=args.images, seed=args.seed, latent=latent, vae=args.vae, model=model)
        try:
            setup = load_setup(base)
        except ValueError as exc:
            log(f"{kind}: skipped ({exc})")
            rows.append({"kind": kind, "skipped": str(exc)})
            continue
        for steps in steps_list:
            s = DemoSettings(images=args.images, steps=steps, seed=args.seed, latent=latent, vae=args.vae, model=model)
            t0 = time.perf_counter()
            unguided = scores(sample(setup, s, None), setup.truth)
            for task in args.tasks.split(","):
                op, y = measure(task, setup.truth, s)
                rule, zeta = GUIDANCE[kind][task]
                rule, zeta = args.rule or rule, zeta if args.zeta is None else args.zeta
                row = {"kind": kind, "task": task, "steps": steps, "rule": rule, "zeta": zeta, "unguided": unguided}
                t1 = time.perf_counter()
                try:
                    row["dps"] = scores(sample(setup, s, DPSGuidance(op, Gaussian(s.sigma), y, zeta=zeta, rule=rule,
                                                                      decoder=setup.decoder)), setup.truth)
                except GuidanceDivergedError as exc:
                    row["dps"] = {"psnr": None, "ssim": None, "error": str(exc)[:200]}
                row["dps_seconds"] = round(time.perf_counter() - t1, 1)
                base_imgs = candidates(op, y, torch.Generator().manual_seed(s.seed))
                base_scores = {name: scores(b, setup.truth) for name, b in base_imgs.items()}
                best = max(base_scores, key=lambda n: base_scores[n]["psnr"] or -1e9)
                row["baseline"] = {**base_scores[best], "name": best}
                if with_deepinv:
                    weights = ([zeta * steps / 10] if args.deepinv_weight == "auto"
                               else [float(w) for w in args.deepinv_weight.split(",")])
                    row["deepinv_dps"] = []
                    for w in weights:
                        t1 = time.perf_counter()
                        try:
                            r = scores(deepinv_dps(setup, s, op, y, w), setup.truth)
                        except Exception as exc:  # noqa: BLE001  (report a failing peer, keep going)
                            r = {"psnr": None, "ssim": None, "error": f"{type(exc).__name__}: {exc}"[:200]}
                        rows_w = {"weight": w, **r, "seconds": round(time.perf_counter() - t1, 1)}
                        row["deepinv_dps"].append(rows_w)
                rows.append(row)
                log(f"{kind:6s} {task:18s} {steps:4d} steps  PSNR dps {_f(row['dps']['psnr'])}  "
                    f"{best} {_f(row['baseline']['psnr'])}  unguided {_f(unguided['psnr'])}"
                    + ("".join(f"  deepinv(w={d['weight']:g}) {_f(d['psnr'])}" for d in row.get("deepinv_dps", [])))
                    + f"  [{time.perf_counter() - t0:.0f} s]")
    out = {"benchmark": "restore", "images": args.images, "steps": steps_list, "seed": args.seed, "sigma": 0.05,
           "priors": {"pixel": args.pixel_model or "bundled", "latent": args.latent_model or "bundled",
                      "vae": Path(args.vae).name if args.vae else None},   # a file name, no machine path
           "deepinv": {"version": DEEPINV, "included": with_deepinv, "error": DEEPINV_ERROR,
                       "weight": args.deepinv_weight},
           "environment": environment(args.threads),
           "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


def _f(v, width: int = 5) -> str:
    return f"{v:{width}.2f}" if v is not None else f"{'-':>{width}}"


def print_table(out: dict) -> None:
    env = out["environment"]
    print(f"\nRestoration, {out['images']} held-out digits, σ = 0.05, seed {out['seed']}; {env['processor']} "
          f"({env['cpus']} CPUs, {env['threads']} thread), torch {env['torch']}, deepinv "
          f"{out['deepinv']['version'] or 'absent'}; {out['seconds']} s. PSNR dB / SSIM")
    print(f"{'prior':6s} {'task':18s} {'steps':>5s} | {'DPS':>12s} | {'best baseline':>26s} | {'unguided':>12s}"
          + (" | deepinv DPS (weight)" if out["deepinv"]["included"] else ""))
    for r in out["rows"]:
        if "skipped" in r:
            print(f"{r['kind']:6s} skipped: {r['skipped']}")
            continue
        cell = lambda d: f"{_f(d['psnr'])} / {_f(d['ssim'], 4)}"  # noqa: E731
        extra = "".join(f" | {cell(d)} ({d['weight']:g})" for d in r.get("deepinv_dps", []))
        print(f"{r['kind']:6s} {r['task']:18s} {r['steps']:5d} | {cell(r['dps']):>12s} | "
              f"{r['baseline']['name'][:12]:>12s} {cell(r['baseline']):>13s} | {cell(r['unguided']):>12s}{extra}")


if __name__ == "__main__":
    sys.exit(main())
