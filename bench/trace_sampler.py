"""Follow x0_hat through guided runs of ComfyUI's samplers on the latent prior: at every model call, the PSNR of
the decoded prediction and its measurement residual ‖A(D(x0_hat)) − y‖ (mean over the digits), the bench's
evenly spaced ("normal") schedule. Shows at which step a sampler loses what guidance gained (bench/README.md,
*Steps that extrapolate far*).

    PYTHONPATH=<torchvision stub> <ComfyUI's python> bench/trace_sampler.py --comfyui <ComfyUI> \
        --vae ../shared/assets/taesd/taesd_decoder.safetensors --samplers euler,dpmpp_3m_sde [--max-gain inf]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from host_defaults import comfy_samplers  # noqa: E402
from dps.sampling import eps_denoiser  # noqa: E402
from dps.schedule import timestep_sigmas  # noqa: E402
from dps import DPSGuidance, Gaussian, alphas_cumprod_from_betas, linear_betas  # noqa: E402
from dps.samplers import MAX_GAIN  # noqa: E402
from dps.app import DemoSettings, load_setup, measure, psnr  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--vae", required=True)
    p.add_argument("--comfyui", required=True)
    p.add_argument("--samplers", default="euler,dpmpp_3m_sde")
    p.add_argument("--task", default="super_resolution")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--max-gain", type=float, default=MAX_GAIN)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    s = DemoSettings(images=args.images, latent=True, vae=args.vae, offset=0)
    setup = load_setup(s)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    denoise = eps_denoiser(setup.prior.eps_model(), ac)
    sigmas = timestep_sigmas(ac, args.steps)
    x_T = torch.randn((args.images, *setup.prior.shape), generator=torch.Generator().manual_seed(0)) * sigmas[0]
    op, y = measure(args.task, setup.truth, s)
    samplers = comfy_samplers(args.comfyui, args.samplers.split(","), args.max_gain)
    out = {}
    for name, run in samplers.items():
        trace = []

        def recorded(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            d = denoise(x, sigma)
            with torch.no_grad():
                image = setup.decoder(d.detach()).clamp(-1, 1)
                residual = (op(image) - y).flatten(1).norm(dim=1).mean()
                trace.append({"sigma": float(sigma[0]), "psnr": float(psnr(image, setup.truth).mean()),
                              "residual": float(residual)})
            return d
        g = DPSGuidance(op, Gaussian(s.sigma), y, zeta=1.0, rule="polyak", decoder=setup.decoder, on_nonfinite="skip")
        z = run(recorded, x_T.clone(), sigmas, g)
        with torch.no_grad():
            final = float(psnr(setup.decoder(z).clamp(-1, 1), setup.truth).mean())
        out[name] = {"final": final, "trace": trace}
        print(f"{name}: final {final:.2f} dB; x0_hat per level (σ: PSNR / residual): "
              + " ".join(f"{r['sigma']:.3f}: {r['psnr']:.1f} / {r['residual']:.2f}" for r in trace))
    print(json.dumps({"task": args.task, "steps": args.steps, "max_gain": args.max_gain, "samplers": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
