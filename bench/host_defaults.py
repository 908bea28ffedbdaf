"""Which strength should the host nodes default to? A host-free rehearsal of the ComfyUI/WebUI path.

The SD1.x-latent prior is turned into a k-diffusion denoiser D(x, σ) (x = x0 + σε, as the hosts sample), the
schedule is the host's "normal" one (steps evenly spaced in the training timesteps), the sampler is Euler,
and guidance is applied by ``dps.host.guided_denoised``, the function the ComfyUI hook and the WebUI script
call, with x0_hat decoded by the real TAESD decoder. It prints PSNR per task for a few strengths and rules,
against the best baseline.

    python bench/host_defaults.py --vae PATH/taesd_decoder.safetensors [--steps 20] [--images 8] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps import (DPSGuidance, Gaussian, alphas_cumprod_from_betas, guided_denoised, linear_betas,  # noqa: E402
                 sigma_from_alpha_cumprod)
from dps.app import DemoSettings, candidates, load_setup, measure, psnr  # noqa: E402


def denoiser_from_eps(eps_model, alphas_cumprod: torch.Tensor):
    """D(x, σ) for x = x0 + σε from an ε-model on the VP process (k-diffusion's DiscreteEpsDDPMDenoiser)."""
    sigmas = sigma_from_alpha_cumprod(alphas_cumprod).float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigmas[None] - sigma.float().view(-1, 1)).abs().argmin(dim=1)
        ac = alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return x - sigma.view(-1, 1, 1, 1) * eps_model(x * ac.sqrt(), t)
    return denoise


def euler(denoise, x, sigmas, guidance: DPSGuidance | None):
    """Euler on the probability-flow ODE (Karras et al. 2022, Algorithm 1 without the second stage)."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, i / (len(sigmas) - 2))
        x = x + (s_next - s) * (x - d) / s
    return x


def dpmpp_2m(denoise, x, sigmas, guidance: DPSGuidance | None):
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2) as k-diffusion's ``sample_dpmpp_2m``
    writes it; the guided prediction is what the multistep history keeps, as in the hosts."""
    old = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, i / (len(sigmas) - 2))
        if s_next == 0:
            x = d
            continue
        h = math.log(s / s_next)
        if old is not None:
            r = math.log(float(sigmas[i - 1]) / s) / h
            d_mix = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
        else:
            d_mix = d
        x = (s_next / s) * x - math.expm1(-h) * d_mix
        old = d
    return x


def _denoised(denoise, x, s: float, s_next: float, guidance: DPSGuidance | None, progress: float):
    s_in = x.new_full((x.shape[0],), s)
    if guidance is None or not guidance.active(progress):
        with torch.no_grad():
            return denoise(x, s_in)
    result = guidance.evaluate(x, lambda x_: denoise(x_, s_in))
    return guided_denoised(result, guidance, s, s - s_next, x)


def euler_ancestral(denoise, x, sigmas, guidance: DPSGuidance | None, seed: int = 1):
    """k-diffusion's ``sample_euler_ancestral`` (η = 1): Euler down to σ_down, then fresh noise of σ_up."""
    gen = torch.Generator().manual_seed(seed)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = _denoised(denoise, x, s, s_next, guidance, i / (len(sigmas) - 2))
        sigma_up = min(s_next, (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        sigma_down = (s_next**2 - sigma_up**2) ** 0.5
        x = x + (sigma_down - s) * (x - d) / s
        if s_next > 0:
            x = x + torch.randn(x.shape, generator=gen) * sigma_up
    return x


SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral, "dpmpp_2m": dpmpp_2m}
# The "simple baseline" per task (bicubic, mean fill, the blurred measurement itself).
SIMPLE = {"super_resolution": "bicubic", "box_inpainting": "mean fill", "random_inpainting": "mean fill",
          "gaussian_deblur": "measurement", "motion_deblur": "measurement"}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vae", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tasks", default="super_resolution,box_inpainting,gaussian_deblur")
    p.add_argument("--settings", default="dps:0.3,dps:1,dps:3,schedule:0.3,schedule:2,polyak:0.3")
    p.add_argument("--samplers", default="euler")
    p.add_argument("--mode", default="full", choices=("full", "x0_only"))
    p.add_argument("--offset", type=int, default=50,
                   help="first held-out digit (50: the tuning digits; 0: the demo's evaluation digits)")
    p.add_argument("--start", type=float, default=0.0, help="guide from this fraction of the steps on")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s = DemoSettings(images=args.images, latent=True, vae=args.vae, offset=args.offset)
    setup = load_setup(s)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    denoise = denoiser_from_eps(setup.prior.eps_model(), ac)
    t_idx = torch.linspace(len(ac) - 1, 0, args.steps).round().long()
    sigmas = torch.cat([sigma_from_alpha_cumprod(ac[t_idx]), torch.zeros(1)])
    x_T = torch.randn((args.images, *setup.prior.shape), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    table: dict[str, dict[str, dict[str, float]]] = {}
    for task in args.tasks.split(","):
        op, y = measure(task, setup.truth, s)
        base = candidates(op, y)
        scores = {f"baseline ({n})": float(psnr(b, setup.truth).mean()) for n, b in base.items()}
        best = max(scores, key=scores.get)
        simple = f"baseline ({SIMPLE[task]})"
        for name in args.samplers.split(","):
            row = table.setdefault(name, {}).setdefault(task, {simple: scores[simple], best: scores[best]})
            for setting in args.settings.split(","):
                rule, zeta = setting.split(":")
                g = DPSGuidance(op, Gaussian(s.sigma), y, zeta=float(zeta), rule=rule, mode=args.mode, start=args.start,
                                decoder=setup.decoder, on_nonfinite="skip")
                z = SAMPLERS[name](denoise, x_T.clone(), sigmas, g)
                with torch.no_grad():
                    row[setting] = float(psnr(setup.decoder(z).clamp(-1, 1), setup.truth).mean())
                print(f"{name:9s} {task:18s} {setting:12s} {row[setting]:6.2f} dB   ({simple} {scores[simple]:.2f}, "
                      f"{best} {scores[best]:.2f})", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "images": args.images, "offset": args.offset, "mode": args.mode,
                          "start": args.start,
                          "psnr": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
