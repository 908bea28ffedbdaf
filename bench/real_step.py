"""Time and memory of a whole guided sampling step on a real model architecture in ComfyUI (issue 10's targets).

The full SD1.5 architecture (860 M-parameter UNet, the KL VAE; random weights, built through ComfyUI's own
classes by ``tests/comfy_families.py``) samples with the KSampler (euler, CFG 5, zero conditioning) at a real
image size, unguided and guided through the node's hook (``nodes.hook.apply_dps``, x4 super-resolution of a
test picture). Each configuration runs in a fresh subprocess; what it reports:

* ``step_s``: seconds per sampling step, the mean over ``--steps`` steps after one warm-up step (ComfyUI's
  own first-call costs, the VAE gradient's memory probe and the model's block measurement, ``dps.recompute``,
  land in the warm-up) and before the last step, timed apart as ``last_s`` (guided, it adds the final
  refinement's decoder gradients, ``dps.host.final_refinement``);
* ``peak_gib``: the peak resident memory of the whole process (model weights included; VmHWM, Linux) during the
  sampling, and ``peak_above_gib`` the part above the resident memory before it.

Configurations (``--configs``): ``unguided``; ``taesd`` (the fast decoder for the whole schedule); ``vae``
(the checkpoint's VAE, ``vae_gradient`` auto); ``vae_checkpointed``, ``vae_tiled``; each guided one with the
node's default gradient ``full`` (through the UNet) or, with the suffix ``:x0_only``, through the decoder only.
``--rule`` and ``--sampler`` set the node's step rule and the KSampler's sampler (``--rule proximal --sampler lcm``:
the data step on x0_hat, ``dps.proximal``, which differentiates the decoder and the operator, and with gradient
``full`` the UNet once for its move (2)).

    COMFYUI_PATH=/path/to/ComfyUI python bench/real_step.py --size 512 --json > out.json
    python bench/real_step.py --show out.json

Run it with a Python that can import ComfyUI (see bench/real_scale.py). Results: ``bench/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAESD_DIR = ROOT.parent / "shared" / "assets" / "taesd"
CONFIGS = ("unguided", "taesd", "taesd:x0_only", "vae", "vae:x0_only", "vae_checkpointed", "vae_checkpointed:x0_only",
           "vae_tiled", "vae_tiled:x0_only")


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")     # resets VmHWM to the current resident set
    except OSError:
        pass


def run_one(config: dict) -> dict:
    """In the child: build SD1.5, sample one configuration, report time per step and peak memory."""
    sys.path.insert(0, str(ROOT / "tests"))
    import comfy_families as cf
    cf.setup_comfy()
    if config.get("attention") == "pytorch":      # ComfyUI's --use-pytorch-cross-attention, its NVIDIA default
        import comfy.cli_args
        comfy.cli_args.args.use_pytorch_cross_attention = True
    os.chdir(os.environ["COMFYUI_PATH"])
    import asyncio

    import torch
    torch.set_num_threads(config["threads"])
    import comfy.model_management as mm
    import comfy.patcher_extension as pe
    import nodes

    assert asyncio.run(nodes.load_custom_node(config["pack"], module_parent="custom_nodes")), "pack did not load"
    n = nodes.NODE_CLASS_MAPPINGS
    base = n["DPSApply"].__module__.rsplit(".", 2)[0]
    hook = sys.modules[f"{base}.nodes.hook"]
    fam = cf.build("sd15", "real", seed=0, tokens=config["tokens"])
    size = config["size"]
    name, _, gradient = config["name"].partition(":")
    gradient = gradient or "full"

    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    picture = torch.stack([0.2 + 0.6 * xx, 0.3 + 0.5 * yy, 0.5 + 0.3 * torch.sin(8 * xx)], dim=-1)[None]
    op = n["DPSSuperResolution"].execute(factor=4, filter="bicubic").args[0]
    noise = n["DPSGaussianNoise"].execute(sigma=0.05).args[0]
    y_img = n["DPSMeasure"].execute(image=picture, operator=op, noise=noise, seed=0).args[0]

    model, patch = fam.model, None
    if name != "unguided":
        surrogate = None
        mode = {"vae": "auto", "vae_checkpointed": "checkpointed", "vae_tiled": "tiled", "taesd": "auto"}[name]
        if name == "taesd":
            import comfy.taesd.taesd
            import comfy.utils
            sd = comfy.utils.load_torch_file(str(TAESD_DIR / "taesd_decoder.safetensors"), safe_load=True)
            surrogate = comfy.taesd.taesd.Decoder(latent_channels=4)
            surrogate.load_state_dict(sd)
            surrogate = surrogate.float().eval().requires_grad_(False)
        settings = hook.Settings(mode=gradient, rule=config.get("rule", "polyak"), vae_gradient=mode, vae_tile=config.get("vae_tile", 0),
                                 denoiser_gradient=config.get("denoiser_gradient", "auto"),
                                 memory_budget=config["budget_gib"] * 2**30 if config.get("budget_gib") else None)
        model, patch = hook.apply_dps(fam.model, fam.vae, y_img, op, noise, settings, surrogate=surrogate,
                                      interrupt=mm.throw_exception_if_processing_interrupted,
                                      wrapper_types=(pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.PREDICT_NOISE))

    times: list[float] = []

    def callback(step, x0, x, total):
        times.append(time.perf_counter())

    latent = {"samples": torch.zeros(1, 4, size // 8, size // 8)}
    import comfy.sample
    import comfy.samplers
    steps = config["steps"] + 2         # a warm-up step, the timed steps, the last step
    with torch.inference_mode():
        noise_t = comfy.sample.prepare_noise(latent["samples"], 7)
        rss_before = _status("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        samples = comfy.sample.sample(model, noise_t, steps, 5.0, config.get("sampler", "euler"), "normal", fam.positive, fam.negative,
                                      latent["samples"], denoise=1.0, callback=callback, disable_pbar=True, seed=7)
        peak = _status("VmHWM")
    marks = [start] + times
    per_step = [b - a for a, b in zip(marks, marks[1:])]
    out = {"config": config["name"], "size": size, "rule": config.get("rule", "polyak"),
           "sampler": config.get("sampler", "euler"), "attention": config.get("attention", "default"),
           "budget_gib": config.get("budget_gib") or None, "vae_tile": config.get("vae_tile", 0), "steps": config["steps"], "finite": bool(torch.isfinite(samples).all()),
           "warmup_s": round(per_step[0], 2), "step_s": round(sum(per_step[1:-1]) / (len(per_step) - 2), 2) if len(per_step) > 2 else None,
           "last_s": round(per_step[-1], 2),
           "peak_gib": round(peak / 2**30, 2), "peak_above_gib": round((peak - rss_before) / 2**30, 2),
           "threads": config["threads"]}
    if patch is not None and patch.last_run is not None:
        run = patch.last_run
        out["distances"] = [round(float(d[0]), 4) for d in run.distances]
        plans = []
        for g in (run.guidance, run.fast_guidance):
            if g is not None:
                plans += [f"{p.mode}" + (f" tile {p.tile}" if p.tile else "") for p in g.decoder_gradient.plans.values()]
        out["plans"] = plans
        recompute = getattr(run.guidance or run.fast_guidance, "denoiser_recompute", None)
        if recompute is not None and gradient == "full":
            out["denoiser_gradient"] = config.get("denoiser_gradient", "auto")
            out["denoiser"] = recompute.reason
            out["denoiser_recomputed"] = [len(recompute.chosen or []), len(recompute.blocks)]
            out["denoiser_saved_gib"] = round(sum(recompute.measured.values()) / 2**30, 2)
    return out


def _child(config: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(config)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"config": config["name"], "size": config["size"], "error": proc.stderr.strip()[-1500:]}
    return json.loads(line[len("RESULT "):])


def table(results: list[dict]) -> str:
    base = {r["size"]: r for r in results if r["config"] == "unguided" and "error" not in r}
    rows = ["| size | configuration | s / step | x unguided | peak GiB (process) | x unguided | above start GiB | plans |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['size']} | {r['config']} | failed: {r['error'][-120:]} | | | | | |")
            continue
        b = base.get(r["size"])
        seconds = r["step_s"]
        if seconds is None:           # --steps 0: the first (warm-up) and the last step only
            seconds = f"{r['warmup_s']} / {r['last_s']} (first / last)"
            ratio_t = f"{r['warmup_s'] / b['warmup_s']:.2f} / {r['last_s'] / b['last_s']:.2f}" if b else ""
        else:
            ratio_t = f"{r['step_s'] / b['step_s']:.2f}" if b and b["step_s"] else ""
        ratio_m = f"{r['peak_gib'] / b['peak_gib']:.2f}" if b else ""
        plans = sorted(set(r.get("plans", [])))
        if r.get("budget_gib"):
            plans.append(f"budget {r['budget_gib']:g} GiB")
        if "denoiser_recomputed" in r:
            chosen, total = r["denoiser_recomputed"]
            plans.append(f"model: {chosen}/{total} blocks recomputed ({r['denoiser_gradient']})")
        rows.append(f"| {r['size']} | {r['config']} | {seconds} | {ratio_t} | {r['peak_gib']} | {ratio_m} | "
                    f"{r['peak_above_gib']} | {', '.join(plans)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--steps", type=int, default=2, help="timed steps between the warm-up step and the last step (0: memory only)")
    parser.add_argument("--tokens", type=int, default=77, help="conditioning length (CLIP: 77)")
    parser.add_argument("--vae-tile", type=int, default=0, help="the node's vae_tile in pixels (0: the largest that fits)")
    parser.add_argument("--denoiser-gradient", default="auto", choices=("auto", "full", "checkpointed"),
                        help="the node's denoiser_gradient for gradient full (dps.recompute)")
    parser.add_argument("--attention", default="default", choices=("default", "pytorch"),
                        help="ComfyUI's attention: its CPU default (sub-quadratic, which keeps the softmax for a "
                             "backward pass) or pytorch's scaled_dot_product_attention, its default on NVIDIA GPUs")
    parser.add_argument("--budget-gib", type=float, default=0,
                        help="the memory the gradient may use (the node's memory_budget; 0: half the free memory), "
                             "e.g. what a smaller card has left after the weights")
    parser.add_argument("--rule", default="polyak", help="the node's step_rule (proximal: the data step; through the UNet only with gradient full)")
    parser.add_argument("--sampler", default="euler", help="the KSampler's sampler (lcm: the one the rule proximal suits)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", metavar="FILE", help="print the table of a saved --json output")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one))))
        return 0
    if args.show:
        data = json.loads(Path(args.show).read_text())
        for run in data.get("runs", [data]):          # one --json output, or several gathered under "runs"
            print(table(run["results"]))
        return 0
    if not os.environ.get("COMFYUI_PATH"):
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (the model is built with its classes)")
    unknown = [c for c in args.configs.split(",") if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configurations {unknown}; choose from {', '.join(CONFIGS)}")
    if args.size % 64:
        raise SystemExit(f"--size must be a multiple of 64 pixels (x4 super-resolution of an 8x latent), got {args.size}")
    import tempfile
    folder = tempfile.mkdtemp(prefix="dps_real_step_")
    pack = os.path.join(folder, "dps_guidance")        # the pack under its usual folder name, as installed
    os.symlink(ROOT, pack, target_is_directory=True)
    results = []
    for name in args.configs.split(","):
        config = {"name": name, "size": args.size, "steps": args.steps, "threads": args.threads,
                  "tokens": args.tokens, "pack": pack, "vae_tile": args.vae_tile,
                  "denoiser_gradient": args.denoiser_gradient, "attention": args.attention,
                  "budget_gib": args.budget_gib, "rule": args.rule, "sampler": args.sampler}
        result = _child(config, args.timeout)
        print(json.dumps(result), file=sys.stderr, flush=True)
        results.append(result)
    if args.json:
        print(json.dumps({"results": results, "torch_threads": args.threads}))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
