"""Memory and time of the gradient through a real VAE architecture at real image sizes (issue 10).

Builds the KL VAE of SD1.x/SDXL (4 latent channels) or of SD3/FLUX (16) with ComfyUI's own classes and seeded
random weights (``comfy.sd.VAE`` from an ``AutoencoderKL`` state dict, as a checkpoint's VAE is built), and the
real TAESD decoders from ``../shared/assets/taesd`` when they are there. For each image size and mode it runs,
in a fresh subprocess, what one guided step costs on the decoder side: the latent gradient of the x4
super-resolution residual, ``DecoderGradient.gradient`` of ``dps.vae_gradient`` (modes full, checkpointed, tiled; ``bf16``: the full
mode with the VAE in bfloat16 and the residual in float32; ``taesd``: the fast decoder), next to the no-grad
decode an unguided run ends with. Peak memory is the child's peak resident set (VmHWM, reset after the model
is built) above its resident set before the step, or CUDA's peak allocation on a GPU. ``--check`` compares the
latent gradients of the bounded modes with the full one (cosine) on super-resolution, blur and inpainting.

    COMFYUI_PATH=/path/to/ComfyUI python bench/real_scale.py --sizes 256,512 --json > out.json
    COMFYUI_PATH=/path/to/ComfyUI python bench/real_scale.py --check --sizes 256
    python bench/real_scale.py --show bench/results/real_scale_cpu.json

Run it with a Python that can import ComfyUI (its requirements; on a CPU-only torch a torchvision stub on
PYTHONPATH, see the README's ComfyUI section). Results and the table: ``bench/README.md``.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MODES = ("nograd", "full", "checkpointed", "tiled", "bf16", "taesd")
FAMILIES = {"sd": (4, "taesd_decoder.safetensors"), "flux": (16, "taef1_decoder.safetensors")}
TAESD_DIR = ROOT.parent / "shared" / "assets" / "taesd"


# ---- in the child -------------------------------------------------------------------------------------
def _import_comfy():
    path = os.environ.get("COMFYUI_PATH")
    if not path:
        raise SystemExit("set COMFYUI_PATH to a ComfyUI checkout (the VAE is built with its classes)")
    sys.path.insert(0, path)
    import comfy.options
    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch
    comfy.cli_args.args.cpu = not torch.cuda.is_available()
    import comfy.sd
    return comfy


def _random_kl_vae(comfy, channels: int):
    """A KL VAE of the SD (4 channels) or SD3/FLUX (16) shape, seeded random weights, via ``comfy.sd.VAE``."""
    import torch
    from comfy.ldm.models.autoencoder import AutoencoderKL
    dd = {"double_z": True, "z_channels": channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    sd = AutoencoderKL(ddconfig=dd, embed_dim=channels).state_dict()
    g = torch.Generator().manual_seed(0)
    for name, t in sd.items():        # ComfyUI's ops skip initialisation: fill every tensor ourselves
        if t.ndim > 1:
            fan_in = t[0].numel()
            sd[name] = torch.randn(t.shape, generator=g) / fan_in ** 0.5
        else:
            sd[name] = torch.ones(t.shape) if "norm" in name and name.endswith("weight") else torch.zeros(t.shape)
    return comfy.sd.VAE(sd=sd)


def _taesd(comfy, file: str):
    import torch
    from safetensors.torch import load_file
    import comfy.taesd.taesd
    sd = load_file(str(TAESD_DIR / file))
    decoder = comfy.taesd.taesd.Decoder(latent_channels=sd["1.weight"].shape[1])
    decoder.load_state_dict(sd)
    return decoder.float().eval().requires_grad_(False)


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _problem(op_name: str, size: int):
    import torch
    from dps.noise import Gaussian
    from dps.operators import GaussianBlur, Inpainting, SuperResolution, box_mask
    if op_name == "sr":
        return SuperResolution(4), Gaussian(0.05)
    if op_name == "blur":
        return GaussianBlur(61, 3.0), Gaussian(0.05)
    mask = box_mask(size, size, box=(size // 2, size // 2), margin=(size // 8, size // 8),
                    generator=torch.Generator().manual_seed(0))
    return Inpainting(mask), Gaussian(0.05)


def _setup(config: dict):
    """VAE (or TAESD), the DecoderGradient for the mode, a latent and a measurement."""
    import torch
    from dps.vae_gradient import DecoderGradient
    comfy = _import_comfy()
    channels, taesd_file = FAMILIES[config["family"]]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = _random_kl_vae(comfy, channels)
    fsm = vae.first_stage_model.to(device)
    if config["mode"] == "bf16":
        fsm = fsm.to(torch.bfloat16)
    dtype = next(fsm.parameters()).dtype
    n = config["size"] // 8
    z = torch.randn(1, channels, n, n, generator=torch.Generator().manual_seed(1)).to(device)
    if config["mode"] == "taesd":
        module = _taesd(comfy, taesd_file).to(device)

        def call(m, latent):
            return m(latent.float()) * 2 - 1
    else:
        module = fsm

        def call(m, latent):
            return m.decode(latent.to(dtype)).float()
    mode = {"bf16": "full", "taesd": "full", "nograd": "full"}.get(config["mode"], config["mode"])
    gradient = DecoderGradient(module, call, mode=mode, tile=config.get("tile", 0), budget=config.get("budget"))
    return gradient, z, device


def _objective(op_name: str, size: int, device, seed: int = 5):
    """``image -> (d, Σd)`` for x4 super-resolution etc. of a measurement made from another random image, as
    ``DPSGuidance`` differentiates it."""
    import torch
    from dps.guidance import DPSGuidance
    op, noise = _problem(op_name, size)
    truth = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)).to(device) * 2 - 1
    with torch.no_grad():
        y = op(truth)
    guidance = DPSGuidance(op, noise, y)

    def objective(image):
        distance = guidance.image_distance(image)
        return distance, distance.sum()
    return objective


def _image_gradient(op_name: str, image, seed: int = 5):
    """``v = ∂d/∂image`` for a measurement made from another random image."""
    import torch
    from dps.guidance import DPSGuidance
    op, noise = _problem(op_name, image.shape[-1])
    truth = torch.rand(image.shape, generator=torch.Generator().manual_seed(seed)).to(image) * 2 - 1
    with torch.no_grad():
        y = op(truth)
    guidance = DPSGuidance(op, noise, y)
    leaf = image.detach().float().requires_grad_(True)
    (v,) = torch.autograd.grad(guidance.image_distance(leaf).sum(), leaf)
    return v


def run_one(config: dict) -> dict:
    import torch
    torch.set_num_threads(config.get("threads", 2))
    gradient, z, device = _setup(config)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import gc
        gc.collect()
        _reset_peak()
        before = _rss()
    start = time.perf_counter()
    plan = None
    if config["mode"] == "nograd":
        gradient.image(z)
    else:
        objective = _objective("sr", config["size"], z.device)
        plan = gradient.plan_for(z)
        _, g = gradient.gradient(z, objective)
        assert torch.isfinite(g).all(), "non-finite latent gradient"
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else _peak()) - before
    return {**config, "seconds": seconds, "peak_gib": peak / 2**30,
            "plan": None if plan is None else {"mode": plan.mode, "tile": plan.tile, "reason": plan.reason}}


def check_one(config: dict) -> dict:
    """Cosine of each bounded mode's latent gradient with the full one, per task."""
    import torch
    from dps.vae_gradient import checkpointed_view, plain_vjp, tiled_vjp, trunk_path, trunk_tiled_vjp
    torch.set_num_threads(config.get("threads", 2))
    gradient, z, _ = _setup({**config, "mode": "taesd" if config.get("decoder") == "taesd" else "full"})
    image = gradient.image(z)
    out = {**config, "cosine": {}}
    for task in ("sr", "blur", "inpaint"):
        v = _image_gradient(task, image)
        full = plain_vjp(gradient.decode, z, v)
        view = checkpointed_view(gradient.module)
        ckpt = plain_vjp(lambda latent: gradient.call(view, latent), z, v)
        overlap = config.get("overlap", 8)
        path = trunk_path(gradient.module)
        plain_tiles = tiled_vjp(gradient.decode, z, v, config["tile"], overlap)
        tiled = (plain_tiles if path is None else
                 trunk_tiled_vjp(gradient.module, gradient.call, path, z, v, config["tile"], overlap))
        cos = torch.nn.functional.cosine_similarity
        out["cosine"][task] = {"checkpointed": float(cos(ckpt.flatten(), full.flatten(), dim=0)),
                               "checkpointed_max_abs_diff": float((ckpt - full).abs().max()),
                               "tiled": float(cos(tiled.flatten(), full.flatten(), dim=0)),
                               "tiled_whole_decoder": float(cos(plain_tiles.flatten(), full.flatten(), dim=0))}
    return out


# ---- in the parent ------------------------------------------------------------------------------------
def _child(config: dict, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--one", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["killed (out of memory?)"])[-1]
        return {**config, "error": f"exit {proc.returncode}: {tail}"}
    return json.loads(lines[-1])


def table(results: list[dict]) -> str:
    rows = ["| family | image | mode | plan | s | peak GiB | x no-grad decode (s / GiB) |", "|---|---|---|---|---|---|---|"]
    base = {(r["family"], r["size"]): r for r in results if r.get("mode") == "nograd" and "error" not in r}
    for r in results:
        if "cosine" in r or r.get("check"):
            continue
        if "error" in r:
            rows.append(f"| {r['family']} | {r['size']} | {r['mode']} | - | - | - | {r['error']} |")
            continue
        b = base.get((r["family"], r["size"]))
        ratio = f"{r['seconds'] / b['seconds']:.1f} / {r['peak_gib'] / max(b['peak_gib'], 1e-3):.1f}" if b else "-"
        plan = "-" if not r.get("plan") else (r["plan"]["mode"] + (f" {r['plan']['tile'] * 8}px" if r["plan"]["tile"] else ""))
        rows.append(f"| {r['family']} | {r['size']} | {r['mode']} | {plan} | {r['seconds']:.1f} | {r['peak_gib']:.2f} | {ratio} |")
    checks = [r for r in results if "cosine" in r]
    if checks:
        rows += ["", "| decoder | family | image | tile px | overlap px | task | cosine checkpointed | max abs diff | cosine tiled | "
                     "cosine tiled, trunk tiled too |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in checks:
            for task, c in r["cosine"].items():
                rows.append(f"| {r.get('decoder', 'kl')} | {r['family']} | {r['size']} | {r['tile'] * 8} | "
                            f"{r.get('overlap', 8) * 8} | {task} | {c['checkpointed']:.6f} | "
                            f"{c['checkpointed_max_abs_diff']:.2e} | {c['tiled']:.4f} | {c['tiled_whole_decoder']:.4f} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="256,512", help="image sides in pixels (comma-separated)")
    parser.add_argument("--families", default="sd", help="sd (SD1.x/SDXL VAE), flux (SD3/FLUX VAE)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--tile", type=int, default=256, help="tile side in pixels for mode tiled and --check")
    parser.add_argument("--check", action="store_true", help="gradient agreement instead of time and memory")
    parser.add_argument("--decoder", default="kl", choices=("kl", "taesd"), help="decoder for --check")
    parser.add_argument("--overlap", type=int, default=64, help="tile overlap in pixels (mode tiled, --check)")
    parser.add_argument("--max-gib", type=float, default=12.0, help="skip a run whose full mode would need more")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--show", metavar="FILE", help="print the tables of a saved --json output")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        config = json.loads(args.one)
        print(json.dumps(check_one(config) if config.get("check") else run_one(config)))
        return 0
    if args.show:
        print(table(json.loads(Path(args.show).read_text())["results"]))
        return 0
    from machine import environment
    results = []
    for family in args.families.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            configs = ([{"check": True, "tile": args.tile // 8, "overlap": args.overlap // 8, "decoder": args.decoder}]
                       if args.check else
                       [{"mode": m, "tile": args.tile // 8 if m == "tiled" else 0} for m in args.modes.split(",")])
            for extra in configs:
                config = {"family": family, "size": size, "threads": args.threads, **extra}
                full_gib = 24.0 * (size / 1024) ** 2          # the KL decoder's full backward, measured scale
                heavy = config.get("mode") in ("full", "bf16") or config.get("decoder") == "kl"
                if heavy and full_gib > args.max_gib:
                    results.append({**config, "error": f"skipped: full backward ~{full_gib:.0f} GiB > --max-gib"})
                    continue
                print(f"running {config}", file=sys.stderr, flush=True)
                results.append(_child(config, args.timeout))
                print(f"  -> {results[-1]}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"environment": environment(args.threads), "results": results}, indent=1))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
