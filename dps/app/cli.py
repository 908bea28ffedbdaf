"""Command line: ``python -m dps <command>``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from ..rules import RULES
from .sampler import SAMPLERS

SAMPLER_HELP = "ddpm: the official DPS loop; proximal: few steps, the measurement fitted at each (README)"


def smoke(args: argparse.Namespace) -> int:
    """Run DPS on the Gaussian-mixture benchmark (exact posterior known) and print how close it gets."""
    from .. import DPSGuidance, alphas_cumprod_from_betas, ddpm_sample, linear_betas
    from ..noise import Gaussian
    from ..validate import check_int
    from .gmm import GaussianMixture, MatrixOperator, as_image, random_problem
    from .metrics import sliced_wasserstein

    check_int("--steps", args.steps, minimum=1, maximum=1000)
    check_int("--seed", args.seed, minimum=0)

    g = torch.Generator().manual_seed(args.seed)
    prior = GaussianMixture.mcg_diff(8, g)
    a = random_problem(8, args.dim_y, g)
    y = a @ prior.sample(1, g)[0] + 0.5 * torch.randn(args.dim_y, generator=g, dtype=torch.float64)
    exact = prior.posterior(a, y, 0.5).sample(1000, torch.Generator().manual_seed(1))
    eps = prior.eps_model(alphas_cumprod_from_betas(linear_betas()))
    guidance = DPSGuidance(MatrixOperator(a), Gaussian(0.5), as_image(y[None]), zeta=2.0, rule="schedule")
    kw = dict(shape=(1000, 8, 1, 1), steps=args.steps, clip_x0=False)
    dps = ddpm_sample(eps, guidance=guidance, generator=torch.Generator().manual_seed(0), show_progress=True, **kw)
    plain = ddpm_sample(eps, generator=torch.Generator().manual_seed(0), **kw)
    result = {
        "sliced_wasserstein_to_exact_posterior": {
            "dps": sliced_wasserstein(dps.flatten(1).double(), exact, 1000, torch.Generator().manual_seed(2)),
            "unconditional": sliced_wasserstein(plain.flatten(1).double(), exact, 1000, torch.Generator().manual_seed(2)),
        }
    }
    if args.json:
        print(json.dumps(result))
    else:
        sw = result["sliced_wasserstein_to_exact_posterior"]
        print(f"Gaussian mixture, d_x=8, d_y={args.dim_y}, {args.steps} DDPM steps, sliced W2 to the exact posterior:")
        print(f"  DPS (schedule rule) {sw['dps']:.3f}   unconditional {sw['unconditional']:.3f}")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Restore held-out digits on every task; print a table (or one JSON object) and write a PNG grid."""
    from .demo import DemoSettings, grid, run
    from .imageio import write_png
    from .tuned import DEFAULT_STEPS, PROXIMAL_STEPS

    check_demo_args(args)
    default = PROXIMAL_STEPS if args.sampler == "proximal" else DEFAULT_STEPS["latent" if args.latent else "pixel"]
    steps = args.steps if args.steps is not None else default
    settings = DemoSettings(images=args.images, steps=steps, seed=args.seed, latent=args.latent,
                            vae=args.vae, model=args.model, sampler=args.sampler)
    # flushed line by line: a pipe or a CI log shows each task as it finishes
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    result = run(settings, log=log, show_progress=not args.json)
    images = result.pop("_images")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        write_png(args.output, grid(result, images))
        result["grid"] = str(args.output)
        log(f"wrote {args.output} (a column group per task; rows: measurement | best baseline | DPS | truth)")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\nmean PSNR (dB) / SSIM over {result['images']} held-out digits, {result['steps']} steps "
              f"({result['sampler']}), "
              f"{result['seconds']:.0f}s in all")
        print(f"{'task':18s} {'DPS':>13s} {'best baseline':>28s} {'unguided':>13s}")
        for task, r in result["tasks"].items():
            sim = r["ssim"]
            print(f"{task:18s} {r['dps']:6.2f}/{sim['dps']:.3f} {r['baseline_name']:>14s} {r['baseline']:6.2f}/"
                  f"{sim['baseline']:.3f} {r['unguided']:6.2f}/{sim['unguided']:.3f}")
    return 0


def check_demo_args(args: argparse.Namespace) -> None:
    """Refuse bad demo options before any work (ValueError naming the option and the fix)."""
    from ..validate import check_int
    from .files import check_output
    from .tuned import MIN_STEPS, TUNING_OFFSET

    check_int("--images", args.images, minimum=1, maximum=TUNING_OFFSET,
              fix=f"the demo reports held-out digits 0-{TUNING_OFFSET - 1} (the others tuned its settings)")
    if args.steps is not None:
        check_int("--steps", args.steps, minimum=MIN_STEPS, maximum=1000,
                  fix="DPS takes many small guided steps; leave --steps out for the tuned default")
    check_int("--seed", args.seed, minimum=0)
    if args.vae is not None and not args.latent:
        raise ValueError("--vae is used only by the latent prior; add --latent (or leave --vae out)")
    if args.output:
        check_output(args.output, "--output", {"--model": args.model, "--vae": args.vae}, create_parent=True)


def restore(args: argparse.Namespace) -> int:
    """Restore a measurement read from an image file with DPS and the embedded prior."""
    from .restore import RestoreRequest, restore_file

    from .tasks import operator_params

    out = restore_file(RestoreRequest(task=args.task, input=args.input, output=args.output, mask=args.mask,
                                      factor=args.factor, steps=args.steps, zeta=args.zeta, rule=args.rule,
                                      sampler=args.sampler,
                                      seed=args.seed, sigma=args.sigma, model=args.model, vae=args.vae,
                                      kernel_size=args.kernel_size, blur_sigma=args.blur_sigma,
                                      intensity=args.intensity, kernel_seed=args.kernel_seed,
                                      params=operator_params(args, args.task)),
                       log=lambda m: print(m, file=sys.stderr))
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="DPS on a Gaussian mixture with a known posterior (seconds)")
    p.add_argument("--dim-y", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=smoke)

    p = sub.add_parser("demo", help="restore held-out digits on every task with the embedded prior")
    p.add_argument("--images", type=int, default=16, help="held-out digits per task (max 50)")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps, respaced from 1000 (ddpm: 200 pixel, 100 latent; proximal: 30)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent", action="store_true", help="use the SD1.x latent prior (needs --vae)")
    p.add_argument("--vae", help="TAESD decoder for SD1.x (taesd_decoder.safetensors)")
    p.add_argument("--model", help="prior weights (.safetensors); default: the bundled one")
    p.add_argument("--output", type=Path, default=Path("out") / "dps_demo.png",
                   help="labelled PNG grid to write (default out/dps_demo.png; out/ is git-ignored)")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=demo)

    from .tasks import add_operator_options, task_names
    p = sub.add_parser("restore", help="restore your own measurement (an image file)")
    p.add_argument("--task", required=True, choices=task_names(), help="the restoration (the operator A)")
    p.add_argument("--input", required=True, type=Path, help="the measurement y as an image")
    p.add_argument("--output", required=True, type=Path, help="where to write the restoration (PNG)")
    p.add_argument("--sigma", type=float, default=0.05, help="noise σ of the measurement on [-1, 1]")
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: 200 ddpm, 30 proximal)")
    p.add_argument("--zeta", type=float, default=None, help="step size (default: tuned per task)")
    p.add_argument("--rule", choices=RULES, default=None, help="step rule (default: tuned per task)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="prior weights (.safetensors); default: the bundled pixel prior")
    p.add_argument("--vae", help="TAESD decoder: selects the latent prior")
    add_operator_options(p)  # --factor, --mask, --kernel-size, ...: one per operator parameter in the registry
    p.set_defaults(func=restore)

    # ``train`` owns its options (dps.app.train); main() hands it the rest of the command line.
    sub.add_parser("train", add_help=False, help="train an embedded prior (python -m dps train --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; every failure is one line on stderr: exit 2 for bad input (the message names the fix),
    1 for a run that failed (guidance diverged, out of memory), 130 when interrupted. DPS_TRACEBACK=1 shows
    the traceback instead."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["train"]:
            from .train import main as train_main

            return train_main(argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except Exception as exc:  # noqa: BLE001  sorted into bad input / failed run below; others re-raised
        code = _exit_code(exc)
        if code is None or os.environ.get("DPS_TRACEBACK"):
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print("error: interrupted; no output was written", file=sys.stderr)
        return 130


def _exit_code(exc: Exception) -> int | None:
    """2 for bad input, 1 for a failed run, None for a bug (its traceback is shown)."""
    from ..guidance import GuidanceDivergedError

    if isinstance(exc, GuidanceDivergedError):
        return 1
    if isinstance(exc, (ValueError, TypeError, OSError)):
        return 2
    if isinstance(exc, (RuntimeError, MemoryError)):
        return 1
    return None


def _one_line(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        text = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, MemoryError):
        text = "out of memory; use fewer images or a smaller input"
    elif isinstance(exc, RuntimeError) and not type(exc).__module__.startswith("dps"):
        text = f"the run failed ({type(exc).__name__}: {exc})"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
