"""DPS step cost on a GPU with full-size Stable Diffusion 1.5 networks (random weights) at 512x512.

    python bench/speed_gpu.py [--json] [--steps 5] [--repeats 3] [--batch 1] [--dtype fp16]
    python bench/speed_gpu.py --check          # parameter counts of the architectures (meta device, no memory)

The UNet (``UNet2DConditionModel`` of SD1.5: channels 320/640/1280/1280, 2 res blocks per level, one
transformer block with 8 heads at the first three levels and in the middle, cross-attention to a 77x768
text context, 859.5 M parameters) and the KL-VAE decoder (512/512/256/128, 3 res blocks per level,
mid attention, 49.5 M parameters) are rebuilt in plain torch; time and memory do not depend on the weights'
values. The three samplers of ``bench/speed.py`` run side by side on a 64x64 latent: ``unguided``,
``full`` (DPS gradient through UNet and VAE decoder) and ``x0_only`` (one UNet forward without graph, the
decoder forward and backward). The operator is 4x super-resolution on the 512x512 decoded image. Prints
ms per step, peak CUDA memory (``max_memory_allocated``) in GiB, and the ratios to unguided.
Exits 0 with a message when CUDA is absent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dps import DPSGuidance, Gaussian, SuperResolution, ddpm_sample  # noqa: E402

MODES = ("unguided", "full", "x0_only")


def norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int | None) -> None:
        super().__init__()
        self.norm1, self.conv1 = norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(t_dim, c_out) if t_dim else None
        self.norm2, self.conv2 = norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time is not None:
            h = h + self.time(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int | None = None, bias: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q, k, v = (t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.q(x), self.k(context), self.v(context)))
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Transformer(nn.Module):
    """SpatialTransformer: GroupNorm, 1x1 proj, [self-attn, cross-attn, GEGLU FF] with pre-LN, 1x1 proj."""

    def __init__(self, c: int, heads: int = 8, context_dim: int = 768) -> None:
        super().__init__()
        self.norm, self.proj_in, self.proj_out = norm(c), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.ln1, self.attn1 = nn.LayerNorm(c), Attention(c, heads)
        self.ln2, self.attn2 = nn.LayerNorm(c), Attention(c, heads, context_dim)
        self.ln3, self.ff_in, self.ff_out = nn.LayerNorm(c), nn.Linear(c, 8 * c), nn.Linear(4 * c, c)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        t = t + self.attn1(self.ln1(t))
        t = t + self.attn2(self.ln2(t), context)
        a, gate = self.ff_in(self.ln3(t)).chunk(2, dim=-1)
        t = t + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(t.transpose(1, 2).reshape(b, c, h, w))


class SD15UNet(nn.Module):
    """The SD1.5 UNet (ε-prediction, 4 latent channels)."""

    def __init__(self, widths=(320, 640, 1280, 1280), attention=(True, True, True, False), layers: int = 2,
                 context_dim: int = 768) -> None:
        super().__init__()
        c0, t_dim = widths[0], widths[0] * 4
        self.c0 = c0
        self.time = nn.Sequential(nn.Linear(c0, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.conv_in = nn.Conv2d(4, c0, 3, padding=1)
        self.down, skips, c = nn.ModuleList(), [c0], c0
        for i, w in enumerate(widths):
            for _ in range(layers):
                self.down.append(nn.ModuleList([ResBlock(c, w, t_dim)] + ([Transformer(w, 8, context_dim)]
                                                                           if attention[i] else [])))
                c = w
                skips.append(c)
            if i < len(widths) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                skips.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, t_dim), Transformer(c, 8, context_dim), ResBlock(c, c, t_dim)])
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            for j in range(layers + 1):
                block = [ResBlock(c + skips.pop(), w, t_dim)] + ([Transformer(w, 8, context_dim)] if attention[i] else [])
                c = w
                if i > 0 and j == layers:
                    block.append(nn.Conv2d(c, c, 3, padding=1))  # after nearest x2 upsampling
                self.up.append(nn.ModuleList(block))
        self.out = nn.Sequential(norm(c0), nn.SiLU(), nn.Conv2d(c0, 4, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        half = self.c0 // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = self.time(torch.cat([args.cos(), args.sin()], 1).to(x.dtype))
        h = self.conv_in(x)
        hs = [h]
        for block in self.down:
            for layer in block:
                h = layer(h, emb) if isinstance(layer, ResBlock) else layer(h, context) if isinstance(
                    layer, Transformer) else layer(h)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb), context), emb)
        for block in self.up:
            h = torch.cat([h, hs.pop()], 1)
            for layer in block:
                if isinstance(layer, ResBlock):
                    h = layer(h, emb)
                elif isinstance(layer, Transformer):
                    h = layer(h, context)
                else:
                    h = layer(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.out(h)


class VAEDecoder(nn.Module):
    """The SD KL-f8 VAE decoder (with post_quant_conv): latent (4, h, w) -> RGB (3, 8h, 8w) in [-1, 1]."""

    def __init__(self, widths=(128, 256, 512, 512), layers: int = 3) -> None:
        super().__init__()
        c = widths[-1]
        self.post_quant = nn.Conv2d(4, 4, 1)
        self.conv_in = nn.Conv2d(4, c, 3, padding=1)
        self.mid1, self.mid_norm, self.mid_attn, self.mid2 = ResBlock(c, c, None), norm(c), Attention(c, 1, bias=True), \
            ResBlock(c, c, None)
        self.up = nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(layers):
                blocks.append(ResBlock(c, w, None))
                c = w
            if i > 0:
                blocks.append(nn.Conv2d(c, c, 3, padding=1))
            self.up.append(nn.ModuleList(blocks))
        self.out = nn.Sequential(norm(c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(self.post_quant(z / 0.18215))
        h = self.mid1(h)
        b, c, hh, ww = h.shape
        t = self.mid_norm(h).flatten(2).transpose(1, 2)
        h = self.mid2(h + self.mid_attn(t).transpose(1, 2).reshape(b, c, hh, ww))
        for blocks in self.up:
            for layer in blocks:
                h = layer(h) if isinstance(layer, ResBlock) else layer(F.interpolate(h, scale_factor=2.0,
                                                                                     mode="nearest"))
        return self.out(h)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=512, help="image side in px (latent side = size/8)")
    p.add_argument("--dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--check", action="store_true", help="print parameter counts (meta device) and exit")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu' only to smoke-test tiny sizes
    p.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)  # divide widths (smoke tests)
    args = p.parse_args(argv)
    if args.check:
        with torch.device("meta"):
            unet, vae = SD15UNet(), VAEDecoder()
        counts = {"unet": count(unet), "vae_decoder": count(vae)}
        print(json.dumps(counts) if args.json else f"SD1.5 UNet {counts['unet']:,} parameters; "
              f"VAE decoder {counts['vae_decoder']:,}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        msg = "speed_gpu: no CUDA device; skipped (run it on a machine with an NVIDIA GPU)."
        print(json.dumps({"benchmark": "speed_gpu", "skipped": msg}) if args.json else msg)
        return 0
    device = torch.device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    s = args.scale
    unet = SD15UNet(widths=tuple(w // s for w in (320, 640, 1280, 1280)), context_dim=768 // s)
    vae = VAEDecoder(widths=tuple(w // s for w in (128, 256, 512, 512)))
    n_unet, n_vae = count(unet), count(vae)
    unet = unet.to(device, dtype).eval().requires_grad_(False)
    vae = vae.to(device, dtype).eval().requires_grad_(False)
    context = torch.randn(args.batch, 77, 768 // s, device=device, dtype=dtype)
    latent = (args.batch, 4, args.size // 8, args.size // 8)
    op = SuperResolution(4)
    y = op(torch.rand(args.batch, 3, args.size, args.size, device=device) * 2 - 1)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(x.to(dtype), t, context).float()

    def decoder(z: torch.Tensor) -> torch.Tensor:
        return vae(z.to(dtype)).float()

    def run(mode: str, steps: int) -> None:
        g = None if mode == "unguided" else DPSGuidance(op, Gaussian(0.05), y, zeta=1e-6, rule="dps", mode=mode,
                                                         decoder=decoder, on_nonfinite="skip")
        with torch.no_grad():
            ddpm_sample(eps, latent, steps=steps, guidance=g, clip_x0=False, device=device,
                        generator=torch.Generator(device).manual_seed(0))

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_mem = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    times: dict[str, list[float]] = {m: [] for m in MODES}
    peak: dict[str, float] = {}
    for mode in MODES:  # warm-up and peak memory, one mode at a time
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        run(mode, 2)
        sync()
        if device.type == "cuda":
            peak[mode] = torch.cuda.max_memory_allocated() / 2**30
    for _ in range(args.repeats):
        for mode in MODES:
            sync()
            t0 = time.perf_counter()
            run(mode, args.steps)
            sync()
            times[mode].append((time.perf_counter() - t0) / args.steps * 1000)
    ms = {m: statistics.median(v) for m, v in times.items()}
    out = {"benchmark": "speed_gpu", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "image_px": args.size,
           "parameters": {"unet": n_unet, "vae_decoder": n_vae}, "weights_gib": base_mem / 2**30,
           "ms_per_step": ms, "time_ratio": {m: ms[m] / ms["unguided"] for m in MODES},
           "peak_gib": peak, "memory_ratio": {m: peak[m] / peak["unguided"] for m in peak} if peak else {},
           "steps": args.steps, "repeats": args.repeats}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{out['device']}, torch {out['torch']}, {args.dtype}, batch {args.batch}, {args.size}x{args.size}; "
              f"UNet {n_unet / 1e6:.1f} M + VAE decoder {n_vae / 1e6:.1f} M parameters (random), "
              f"weights {out['weights_gib']:.2f} GiB")
        for m in MODES:
            mem = f"  peak {peak[m]:.2f} GiB (x{out['memory_ratio'][m]:.2f})" if peak else ""
            print(f"  {m:9s} {ms[m]:8.1f} ms/step (x{out['time_ratio'][m]:.2f}){mem}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
