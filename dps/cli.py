"""Command line: ``python -m dps <command>``."""

from __future__ import annotations

import argparse
import json
import sys

import torch


def smoke(args: argparse.Namespace) -> int:
    """Run DPS on the Gaussian-mixture benchmark (exact posterior known) and print how close it gets."""
    from .gmm import GaussianMixture, MatrixOperator, as_image, random_problem
    from .guidance import DPSGuidance
    from .metrics import sliced_wasserstein
    from .noise import Gaussian
    from .sampling import ddpm_sample
    from .schedule import alphas_cumprod_from_betas, linear_betas

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dps", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("smoke", help="DPS on a Gaussian mixture with a known posterior (seconds)")
    p.add_argument("--dim-y", type=int, default=2, choices=(1, 2, 4))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
