"""The every-sampler tables of bench/README.md from ``host_defaults.py --json`` results.

Each ``--grid LABEL FILE [FILE ...]`` is one schedule and step count; a later file's rows replace an earlier one's
(a re-measured subset over the full run). A file run with ``--discard-penultimate euler`` gives the reference for
the samplers ComfyUI runs on one level more with the penultimate dropped (UniPC, DPM-2): euler on those levels.

    python bench/sampler_table.py --grid normal A.json B.json --grid karras C.json D.json

Prints a markdown table (PSNR dB, difference to euler on the same levels; ✗ = behind the task's simple
baseline or more than 1 dB behind), then per grid the samplers that miss the target, and the samplers that
meet it in every grid.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from host_defaults import DISCARD_PENULTIMATE, SIMPLE  # noqa: E402

TASKS = ("super_resolution", "box_inpainting", "gaussian_deblur")
HEAD = {"super_resolution": "SR x4", "box_inpainting": "inpainting", "gaussian_deblur": "deblur"}


def load_grid(files: list[str], setting: str) -> tuple[dict, dict, dict]:
    """(PSNR per sampler and task, the simple baseline per task, euler on the dropped-penultimate levels)."""
    rows: dict[str, dict[str, float]] = {}
    simple: dict[str, float] = {}
    discarded: dict[str, float] = {}
    for name in files:
        data = json.loads(Path(name).read_text())
        for sampler, tasks in data["psnr"].items():
            for task, scores in tasks.items():
                simple[task] = scores[f"baseline ({SIMPLE[task]})"]
                if sampler == "euler" and "euler" in data.get("discard_penultimate", []):
                    discarded[task] = scores[setting]
                else:
                    rows.setdefault(sampler, {})[task] = scores[setting]
    return rows, simple, discarded


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--grid", action="append", nargs="+", required=True, metavar="LABEL FILE",
                   help="a label, then the results of one schedule and step count, later files replacing rows")
    p.add_argument("--setting", default="polyak:1")
    args = p.parse_args()
    grids = []
    for label, *files in args.grid:
        if not files:
            p.error(f"--grid {label}: give the result files after the label")
        grids.append((label, *load_grid(files, args.setting)))
    order = list(grids[0][1])
    header = "| sampler | " + " | ".join(f"{label}: {HEAD[t]}" if i == 0 else HEAD[t]
                                         for label, *_ in grids for i, t in enumerate(TASKS)) + " |"
    print(header)
    print("|" + "---|" * (1 + 3 * len(grids)))
    print("| simple baseline | " + " | ".join(f"{simple[t]:.2f}" for _, _, simple, _ in grids for t in TASKS) + " |")
    missing: dict[str, list[str]] = {label: [] for label, *_ in grids}
    for sampler in order:
        cells = []
        for label, rows, simple, discarded in grids:
            met = True
            for task in TASKS:
                value = rows[sampler][task]
                same_levels = sampler in DISCARD_PENULTIMATE and task in discarded
                reference = discarded[task] if same_levels else rows["euler"][task]
                ok = value > simple[task] and value >= reference - 1.0
                met = met and ok
                cells.append(f"{value:.2f} ({value - reference:+.2f}{'*' if same_levels else ''})" + ("" if ok else " ✗"))
            if not met:
                missing[label].append(sampler)
        print(f"| {sampler} | " + " | ".join(cells) + " |")
    print()
    for label, *_ in grids:
        print(f"{label}: {len(order) - len(missing[label])} of {len(order)} meet the target; "
              f"behind: {', '.join(missing[label]) or 'none'}")
    everywhere = [s for s in order if not any(s in m for m in missing.values())]
    print(f"in every grid: {len(everywhere)} ({', '.join(everywhere)})")
    if any(discarded for *_, discarded in grids):
        print("* against euler on the same levels (one more, the penultimate dropped, as ComfyUI runs this sampler)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
