"""Time per sampler step and peak memory of DPS guidance against unguided sampling, on the CPU.

    python bench/speed.py [--json] [--steps 8] [--repeats 5] [--batch 1] [--threads 1] [--vae PATH]

For each model and size, three samplers run side by side (interleaved, so a load change on the machine hits
all three alike): ``unguided`` (``ddpm_sample`` without guidance), ``full`` (DPS, gradient through the
denoiser and, for the latent model, the decoder) and ``x0_only`` (gradient w.r.t. x0_hat only: one denoiser
forward without graph, then the decoder and operator forward and backward).

* pixel: the embedded pixel prior's architecture, ``SmallUNet(1, 16, (1, 2, 4))``, at 28², 64², 128² px;
* latent: the latent prior's ``SmallUNet(4, 32, (1, 2))`` at 8², 16², 32² latents (64², 128², 256² px) with
  the real TAESD decoder (``--vae``; default ``../shared/assets/taesd/taesd_decoder.safetensors`` beside the
  repository when present) in the guided modes; the unguided sampler never decodes inside the loop (as in the
  hosts).

Weights are random (time and memory do not depend on their values). The operator is 4x super-resolution
(bicubic) on the image; guidance uses a tiny ζ so random weights cannot diverge (the cost is unchanged).
Time: median over ``--repeats`` runs of ``--steps`` DDPM steps, divided by the steps. Memory: each
(model, size, mode) in a fresh Python process; ``peak`` is its maximum RSS (``getrusage``) during sampling
minus its RSS just before, i.e. the working memory the step needs beyond the weights and inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps import DPSGuidance, Gaussian, SuperResolution, ddpm_sample  # noqa: E402
from dps.app import SmallUNet  # noqa: E402
from bench.machine import environment  # noqa: E402

TAESD = Path(__file__).resolve().parents[2] / "shared" / "assets" / "taesd" / "taesd_decoder.safetensors"  # ../shared
MODES = ("unguided", "full", "x0_only")
CONFIGS = {  # kind: (unet args, model-space sides)
    "pixel": ((1, 16, (1, 2, 4)), (28, 64, 128)),
    "latent": ((4, 32, (1, 2)), (8, 16, 32)),
}


def build(kind: str, side: int, batch: int, vae: Path | None):
    """(eps_model, shape, decoder, operator, y) for one configuration, seeded."""
    torch.manual_seed(0)
    args, _ = CONFIGS[kind]
    unet = SmallUNet(*args).eval().requires_grad_(False)
    shape = (batch, args[0], side, side)
    decoder = None
    if kind == "latent":
        if vae is not None and vae.is_file():
            from dps.app import load_taesd
            taesd = load_taesd(vae, "decoder")
        else:  # same architecture, random weights
            from dps.app import TinyDecoder
            taesd = TinyDecoder(4)
        taesd = taesd.eval().requires_grad_(False)
        decoder = lambda z: taesd(z) * 2 - 1  # noqa: E731
        image = (batch, 3, side * 8, side * 8)
    else:
        image = shape
    op = SuperResolution(4)
    y = op(torch.rand(image) * 2 - 1)
    return (lambda x, t: unet(x, t)), shape, decoder, op, y


def sample(setup, mode: str, steps: int) -> None:
    eps, shape, decoder, op, y = setup
    guidance = None
    if mode != "unguided":
        guidance = DPSGuidance(op, Gaussian(0.05), y, zeta=1e-6, rule="dps", mode=mode, decoder=decoder,
                               on_nonfinite="skip")
    ddpm_sample(eps, shape, steps=steps, guidance=guidance, clip_x0=decoder is None,
                generator=torch.Generator().manual_seed(0))


def rss_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux >= 4.0: ``echo 5 > clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kib(resettable: bool) -> int:
    if resettable:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def memory_child(kind: str, side: int, mode: str, batch: int, steps: int, vae: str | None, threads: int) -> dict:
    """Peak RSS during sampling minus RSS before it. Where VmHWM cannot be reset, getrusage's lifetime
    maximum is used and a peak below the set-up's own is reported as 0 (``exact`` false)."""
    torch.set_num_threads(threads)
    setup = build(kind, side, batch, Path(vae) if vae else None)
    before = rss_kib()
    resettable = reset_peak()
    base_peak = peak_kib(resettable)
    sample(setup, mode, steps)
    peak = peak_kib(resettable)
    delta = (peak - before) if (resettable or peak > base_peak) else 0
    return {"rss_before_mib": before / 1024, "peak_rss_mib": peak / 1024, "peak_delta_mib": max(delta, 0) / 1024,
            "exact": resettable}


def measure_memory(kind: str, side: int, mode: str, args) -> dict:
    cmd = [sys.executable, __file__, "--_memory", kind, str(side), mode, "--batch", str(args.batch),
           "--steps", str(min(args.steps, 3)), "--threads", str(args.threads)]
    if args.vae:
        cmd += ["--vae", args.vae]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def decode_step(setup) -> None:
    """One decoder forward and backward to its input: the part of a guided latent step that is not the UNet."""
    _, shape, decoder, op, y = setup
    z = torch.randn(shape).requires_grad_(True)
    (op(decoder(z)) - y).square().sum().backward()


def measure_time(setups: dict, steps: int, repeats: int) -> dict:
    """Median ms per step of each mode (interleaved runs); for latent models also ``decoder`` (ms per
    decoder forward + backward, measured in the same rounds)."""
    for mode, setup in setups.items():  # warm-up
        sample(setup, mode, 2)
    with_decoder = setups["full"][2] is not None
    times: dict[str, list[float]] = {m: [] for m in list(setups) + (["decoder"] if with_decoder else [])}
    for _ in range(repeats):
        for mode, setup in setups.items():
            t0 = time.perf_counter()
            sample(setup, mode, steps)
            times[mode].append((time.perf_counter() - t0) / steps)
        if with_decoder:
            t0 = time.perf_counter()
            for _ in range(steps):
                decode_step(setups["full"])
            times["decoder"].append((time.perf_counter() - t0) / steps)
    return {m: statistics.median(v) * 1000 for m, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--show", metavar="FILE", help="print the tables of a saved --json output and exit")
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=8, help="DDPM steps per timed run (default 8)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per mode; the median is kept (default 5)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--kinds", default="pixel,latent")
    p.add_argument("--sizes", help="model-space sides per kind, e.g. 'pixel=28,64;latent=8' (default: all three)")
    p.add_argument("--vae", default=str(TAESD) if TAESD.is_file() else None,
                   help="TAESD decoder (default: the shared asset; random weights when absent)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-mode memory subprocesses")
    p.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.show:
        print_table(json.loads(Path(args.show).read_text()))
        return 0
    if args._memory:
        kind, side, mode = args._memory
        print(json.dumps(memory_child(kind, int(side), mode, args.batch, args.steps, args.vae, args.threads)))
        return 0
    torch.set_num_threads(args.threads)
    sizes = {k: v[1] for k, v in CONFIGS.items()}
    if args.sizes:
        for part in args.sizes.split(";"):
            k, v = part.split("=")
            sizes[k] = tuple(int(s) for s in v.split(","))
    log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else (lambda m: print(m, flush=True))
    rows = []
    start = time.perf_counter()
    for kind in args.kinds.split(","):
        for side in sizes[kind]:
            setups = {m: build(kind, side, args.batch, Path(args.vae) if args.vae else None) for m in MODES}
            ms = measure_time(setups, args.steps, args.repeats)
            mem = {} if args.no_memory else {m: measure_memory(kind, side, m, args) for m in MODES}
            px = side * 8 if kind == "latent" else side
            row = {"kind": kind, "side": side, "image_px": px, "batch": args.batch,
                   "decoder": ("taesd" if args.vae else "taesd-random") if kind == "latent" else None,
                   "ms_per_step": ms,
                   "time_ratio": {m: ms[m] / ms["unguided"] for m in MODES},
                   "decoder_ms": ms.get("decoder"),
                   "memory_mib": {m: mem[m]["peak_delta_mib"] for m in mem},
                   "peak_rss_mib": {m: mem[m]["peak_rss_mib"] for m in mem}}
            if mem and mem["unguided"]["peak_delta_mib"] > 0:
                row["memory_ratio"] = {m: mem[m]["peak_delta_mib"] / mem["unguided"]["peak_delta_mib"] for m in MODES}
            rows.append(row)
            log(f"{kind:6s} {side:3d} ({px} px): " + "  ".join(
                f"{m} {ms[m]:.1f} ms (x{row['time_ratio'][m]:.2f})" for m in MODES)
                + ("" if not mem else "  | peak MiB " + " ".join(f"{m} {row['memory_mib'][m]:.0f}" for m in MODES)))
    out = {"benchmark": "speed", "device": "cpu", "rows": rows, "steps": args.steps, "repeats": args.repeats,
           "environment": environment(args.threads),
           "seconds": round(time.perf_counter() - start, 1)}
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


def print_table(out: dict) -> None:
    env = out["environment"]
    print(f"\nDPS step cost on {env['processor']} ({env['cpus']} CPUs, {env['threads']} thread), torch {env['torch']}, "
          f"batch {out['rows'][0]['batch'] if out['rows'] else '-'}; median of {out['repeats']} x {out['steps']} steps")
    print(f"{'model':7s} {'image':>7s} | {'unguided ms':>11s} {'full ms':>9s} {'x0_only ms':>10s} | "
          f"{'full/ung':>8s} {'x0/ung':>7s} | {'peak MiB ung/full/x0':>22s} | {'decoder f+b ms':>14s}")
    for r in out["rows"]:
        ms, ratio, mem = r["ms_per_step"], r["time_ratio"], r["memory_mib"]
        mems = "/".join(f"{mem[m]:.0f}" for m in MODES) if mem else "-"
        print(f"{r['kind']:7s} {str(r['image_px']) + 'px':>7s} | {ms['unguided']:11.1f} {ms['full']:9.1f} "
              f"{ms['x0_only']:10.1f} | {ratio['full']:8.2f} {ratio['x0_only']:7.2f} | {mems:>22s} | "
              f"{'-' if r['decoder_ms'] is None else format(r['decoder_ms'], '.1f'):>14s}")


if __name__ == "__main__":
    sys.exit(main())
