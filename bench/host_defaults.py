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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from dps.baselines import candidates  # noqa: E402
from dps.demo import DemoSettings, load_setup, measure  # noqa: E402
from dps.guidance import DPSGuidance  # noqa: E402
from dps.host import guided_denoised  # noqa: E402
from dps.metrics import psnr  # noqa: E402
from dps.noise import Gaussian  # noqa: E402
from dps.schedule import alphas_cumprod_from_betas, linear_betas, sigma_from_alpha_cumprod  # noqa: E402


def denoiser_from_eps(eps_model, alphas_cumprod: torch.Tensor):
    """D(x, σ) for x = x0 + σε from an ε-model on the VP process (k-diffusion's DiscreteEpsDDPMDenoiser)."""
    sigmas = sigma_from_alpha_cumprod(alphas_cumprod).float()

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        t = (sigmas[None] - sigma.float().view(-1, 1)).abs().argmin(dim=1)
        ac = alphas_cumprod[t].to(x.dtype).view(-1, 1, 1, 1)
        return x - sigma.view(-1, 1, 1, 1) * eps_model(x * ac.sqrt(), t)
    return denoise


def euler(denoise, x, sigmas, guidance: DPSGuidance | None):
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        s_in = x.new_full((x.shape[0],), s)
        if guidance is None:
            with torch.no_grad():
                d = denoise(x, s_in)
        else:
            result = guidance.evaluate(x, lambda x_: denoise(x_, s_in))
            d = guided_denoised(result, guidance, s, s - s_next, x)
        x = x + (s_next - s) * (x - d) / s
    return x


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vae", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--tasks", default="super_resolution,box_inpainting,gaussian_deblur")
    p.add_argument("--settings", default="dps:0.3,dps:1,dps:3,schedule:0.3,schedule:2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s = DemoSettings(images=args.images, latent=True, vae=args.vae, offset=50)   # tuning digits, not the demo's
    setup = load_setup(s)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    denoise = denoiser_from_eps(setup.prior.eps_model(), ac)
    t_idx = torch.linspace(len(ac) - 1, 0, args.steps).round().long()
    sigmas = torch.cat([sigma_from_alpha_cumprod(ac[t_idx]), torch.zeros(1)])
    x_T = torch.randn((args.images, *setup.prior.shape), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    table: dict[str, dict[str, float]] = {}
    for task in args.tasks.split(","):
        op, y = measure(task, setup.truth, s)
        base = candidates(op, y)
        scores = {f"baseline ({n})": float(psnr(b, setup.truth).mean()) for n, b in base.items()}
        best = max(scores, key=scores.get)
        table[task] = {best: scores[best]}
        for setting in args.settings.split(","):
            rule, zeta = setting.split(":")
            g = DPSGuidance(op, Gaussian(s.sigma), y, zeta=float(zeta), rule=rule, decoder=setup.decoder,
                            on_nonfinite="skip")
            z = euler(denoise, x_T.clone(), sigmas, g)
            with torch.no_grad():
                table[task][setting] = float(psnr(setup.decoder(z).clamp(-1, 1), setup.truth).mean())
            print(f"{task:18s} {setting:12s} {table[task][setting]:6.2f} dB   ({best} {scores[best]:.2f})",
                  file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"steps": args.steps, "images": args.images, "psnr": table}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
