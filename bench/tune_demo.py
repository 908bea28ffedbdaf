"""Tune the demo's (rule, zeta) per task on held-out digits 50-99, which the demo's report (0-49) never uses.

    python bench/tune_demo.py [--latent --vae PATH] [--images 16] [--steps 200] [--json]

Prints mean PSNR for every (rule, zeta) and the best per task; ``dps/app/tuned.py``'s GUIDANCE table holds
the result.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps import DPSGuidance, Gaussian  # noqa: E402
from dps.app import TASKS, TUNING_OFFSET, DemoSettings, load_setup, measure, psnr, sample  # noqa: E402

GRID = {"dps": (0.3, 1.0, 3.0), "schedule": (10.0, 30.0, 100.0), "polyak": (1.0, 3.0, 10.0)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--latent", action="store_true")
    p.add_argument("--vae")
    p.add_argument("--images", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--rules", default="dps,schedule")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    s = DemoSettings(images=args.images, steps=args.steps, latent=args.latent, vae=args.vae, offset=TUNING_OFFSET)
    setup = load_setup(s)
    table: dict[str, dict[str, float]] = {}
    for task in args.tasks.split(","):
        op, y = measure(task, setup.truth, s)
        table[task] = {}
        for rule in args.rules.split(","):
            for zeta in GRID[rule]:
                try:
                    x = sample(setup, s, DPSGuidance(op, Gaussian(s.sigma), y, zeta=zeta, rule=rule,
                                                     decoder=setup.decoder))
                    score = float(psnr(x, setup.truth).mean())
                except Exception as exc:  # a diverged setting scores -inf, and the sweep goes on
                    print(f"{task} {rule} {zeta}: {exc}", file=sys.stderr)
                    score = float("-inf")
                table[task][f"{rule}:{zeta:g}"] = score
                print(f"{task:18s} {rule:9s} zeta={zeta:<6g} PSNR {score:6.2f}", file=sys.stderr, flush=True)
        best = max(table[task], key=table[task].get)
        print(f"{task:18s} best {best} ({table[task][best]:.2f} dB)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
