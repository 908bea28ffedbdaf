"""Few host steps against the official 1000-step DPS, on the project's pixel prior (issue 11, item 2).

The official loop: ancestral DDPM, 1000 steps, rule ``dps`` with the demo's tuned ζ (``dps.app.tuned``: ζ = 3 at
200 steps, rescaled to 0.6 at 1000), x0_hat clipped as the official code does; ``--official-samplers ddim`` runs
the same loop deterministically (DDIM with η = 0, the same guided update), the reference a deterministic host
sampler is measured against. The host path: the prior as a k-diffusion denoiser D(x, σ)
(``dps.sampling.eps_denoiser``), the host's "normal" schedule, Euler or Euler ancestral, guidance through
``dps.host.guided_correction`` at the hosts' defaults (``polyak``, ζ = 1, gradient ``full``) unless ``--settings``
says otherwise. Held-out digits ``--offset``.. (0-7 by default), Gaussian noise σ = 0.05; PSNR (dB) per task,
and the final residual ‖y − A(x)‖ over its noise floor E‖n‖ (1 = fits the data as well as the truth does).

    python bench/few_steps.py --json > bench/results/few_steps.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

from dps import DPSGuidance, Gaussian, alphas_cumprod_from_betas, linear_betas, sigma_from_alpha_cumprod  # noqa: E402
from dps.app import DemoSettings, load_setup, measure, psnr  # noqa: E402
from dps.app.tuned import guidance_for  # noqa: E402
from dps.sampling import ddim_sample, ddpm_sample  # noqa: E402
from host_defaults import euler, euler_ancestral  # noqa: E402
from dps.host import FINAL_ITERATIONS, MOVE_SHARE  # noqa: E402
from dps.proximal import ITERATIONS, LAMBDA, PULL  # noqa: E402
from dps.sampling import eps_denoiser, proximal_sample  # noqa: E402
from dps.schedule import timestep_sigmas  # noqa: E402

HOST_SAMPLERS = {"euler": euler, "euler_ancestral": euler_ancestral}
# The official loop's forms (``--official-samplers``): the paper's ancestral DDPM, and DDIM with η = 0, the same loop
# without fresh noise.
OFFICIAL_LOOPS = {"ddpm": ddpm_sample, "ddim": partial(ddim_sample, eta=0.0)}


def residual_ratio(op, y: torch.Tensor, x: torch.Tensor, noise: Gaussian) -> float:
    """Mean over the batch of ‖y − A(x)‖ / E‖n‖."""
    with torch.no_grad():
        d = noise.distance(y, op(x))
    floor = noise.expected_distance(y[:1])
    return float((d / floor).mean())


def official_settings(spec: str, task: str, steps: int) -> list[tuple[str, float]]:
    """The (rule, ζ) pairs of ``--official-rules``: ``tuned`` is the demo's tuned rule for ``task`` at ``steps``."""
    pairs = []
    for item in spec.split(","):
        if item == "tuned":
            pairs.append(guidance_for("pixel", task, steps))
        else:
            rule, zeta = item.split(":")
            pairs.append((rule, float(zeta)))
    return pairs


def official_run(setup, op, y: torch.Tensor, noise: Gaussian, rule: str, zeta: float, steps: int, seed: int,
                 trace_every: int = 0, sampler: str = "ddpm") -> dict:
    """The official loop in the form ``sampler`` names (``OFFICIAL_LOOPS``) with ``rule`` at ``zeta``: PSNR, final
    residual over its floor, seconds, and with ``trace_every`` the prediction's residual over the floor and PSNR
    every that many steps."""
    g = DPSGuidance(op, noise, y, zeta=zeta, rule=rule)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    floor = float(noise.expected_distance(y[:1]))
    trace: list[dict] = []

    def record(info: dict) -> None:
        if info["i"] % trace_every == 0 or info["i"] == steps - 1:
            trace.append({"step": info["i"], "sigma": float(sigma_from_alpha_cumprod(ac[info["t"]])),
                          "residual": float(info["distance"].mean()) / floor,
                          "psnr_x0_hat": float(psnr(info["x0_hat"].clamp(-1, 1), setup.truth).mean())})
    t0 = time.monotonic()
    loop = OFFICIAL_LOOPS[sampler]
    x = loop(setup.prior.eps_model(), (len(setup.truth), *setup.prior.shape), steps=steps, guidance=g,
             generator=torch.Generator().manual_seed(seed), callback=record if trace_every else None)
    x = x.clamp(-1, 1)
    return {"psnr": float(psnr(x, setup.truth).mean()), "residual": residual_ratio(op, y, x, noise),
            "seconds": time.monotonic() - t0, **({"trace": trace} if trace else {})}


def host_run(name: str, setting: str, args: argparse.Namespace, denoise, x_T: torch.Tensor, sigmas: torch.Tensor,
             op, y: torch.Tensor, noise: Gaussian) -> tuple[str, torch.Tensor]:
    """One host-path run: ``proximal`` (``dps.proximal``'s sampler, ``setting`` its λ:κ) or a host sampler guided by
    ``setting`` = rule:ζ. Returns the setting's label and the clamped sample."""
    if name == "proximal":
        lam, pull = (float(v) for v in setting.split(":"))
        g = DPSGuidance(op, noise, y, mode=args.mode, start=args.start)
        x = proximal_sample(denoise, x_T, sigmas, g, lam=lam, iterations=args.cg_iterations, pull=pull,
                            generator=torch.Generator().manual_seed(1))
        return f"lambda:{lam:g} cg:{args.cg_iterations} pull:{pull:g}", x.clamp(-1, 1)
    rule, zeta = setting.split(":")
    g = DPSGuidance(op, noise, y, zeta=float(zeta), rule=rule, mode=args.mode, start=args.start, on_nonfinite="skip")
    x = HOST_SAMPLERS[name](denoise, x_T, sigmas, g, final_iterations=args.final_iterations,
                            move_share=args.move_share)
    return setting, x.clamp(-1, 1)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--offset", type=int, default=0)
    p.add_argument("--tasks", default="super_resolution,box_inpainting,gaussian_deblur")
    p.add_argument("--steps", default="30", help="host step counts (comma-separated)")
    p.add_argument("--samplers", default="euler,euler_ancestral",
                   help="euler, euler_ancestral (the hosts' path, --settings), proximal (dps.proximal, --lam)")
    p.add_argument("--lam", default=str(LAMBDA), help="the proximal sampler's λ values (comma-separated)")
    p.add_argument("--pull", default=str(PULL),
                   help="the proximal sampler's share κ of the move through the denoiser, dps.proximal (2) "
                        "(comma-separated; 0: none; mode x0_only: none)")
    p.add_argument("--cg-iterations", type=int, default=ITERATIONS,
                   help="the proximal sampler's conjugate-gradient iterations per step")
    p.add_argument("--final-iterations", type=int, default=FINAL_ITERATIONS,
                   help="Polyak iterations on the host path's last prediction (dps.host.final_refinement; 0: none)")
    p.add_argument("--move-share", type=float, default=MOVE_SHARE,
                   help="dps.host.step_limit's share (inf: no bound on one step's move, as before it existed)")
    p.add_argument("--settings", default="polyak:1", help="host rule:zeta pairs (comma-separated)")
    p.add_argument("--mode", default="full", choices=("full", "x0_only"))
    p.add_argument("--start", type=float, default=0.0, help="guide from this fraction of the steps on")
    p.add_argument("--official-steps", type=int, default=1000, help="0 leaves the official loop out")
    p.add_argument("--official-rules", default="tuned",
                   help="rule:zeta pairs for the official loop (comma-separated); tuned: the demo's dps ζ "
                        "(dps.app.tuned)")
    p.add_argument("--official-samplers", default="ddpm",
                   help=f"the official loop's forms (comma-separated) of {', '.join(OFFICIAL_LOOPS)}: ddpm (the "
                        "paper's), ddim (η = 0: deterministic)")
    p.add_argument("--trace-every", type=int, default=0,
                   help="record the DDPM loop's residual over its floor and x0_hat's PSNR every N steps (0: not)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    unknown = set(args.official_samplers.split(",")) - set(OFFICIAL_LOOPS)
    if unknown:
        p.error(f"--official-samplers: unknown {', '.join(sorted(unknown))}; pick from {', '.join(OFFICIAL_LOOPS)}")
    torch.set_num_threads(args.threads)
    s = DemoSettings(images=args.images, offset=args.offset, latent=False)
    setup = load_setup(s)
    ac = alphas_cumprod_from_betas(linear_betas()).float()
    denoise = eps_denoiser(setup.prior.eps_model(), ac)
    noise = Gaussian(s.sigma)
    results: dict = {"images": args.images, "offset": args.offset, "mode": args.mode, "start": args.start,
                     "move_share": args.move_share, "tasks": {}}
    proximal = [f"{lam}:{pull}" for lam in args.lam.split(",") for pull in args.pull.split(",")]   # λ:κ settings
    for task in args.tasks.split(","):
        op, y = measure(task, setup.truth, s)
        row = results["tasks"].setdefault(task, {})
        if args.official_steps:
            for loop, (rule, zeta) in product(args.official_samplers.split(","),
                                              official_settings(args.official_rules, task, args.official_steps)):
                key = f"official {loop} {args.official_steps} {rule}:{zeta:g}"
                row[key] = official_run(setup, op, y, noise, rule, zeta, args.official_steps, s.seed + 1,
                                        args.trace_every, loop)
                print(task, key, {k: v for k, v in row[key].items() if k != "trace"}, file=sys.stderr, flush=True)
                for point in row[key].get("trace", []):
                    print(f"  step {point['step']:4d}  σ {point['sigma']:7.2f}  residual/floor "
                          f"{point['residual']:6.2f}  x0_hat {point['psnr_x0_hat']:5.2f} dB", file=sys.stderr)
        for steps in (int(v) for v in args.steps.split(",")):
            sigmas = timestep_sigmas(ac, steps)
            x_T = torch.randn((len(setup.truth), *setup.prior.shape),
                              generator=torch.Generator().manual_seed(0)) * sigmas[0]
            for name in args.samplers.split(","):
                for setting in (proximal if name == "proximal" else args.settings.split(",")):
                    t0 = time.monotonic()
                    setting, x = host_run(name, setting, args, denoise, x_T.clone(), sigmas, op, y, noise)
                    key = f"{name} {steps} {setting}"
                    row[key] = {"psnr": float(psnr(x, setup.truth).mean()), "residual": residual_ratio(op, y, x, noise),
                                "seconds": time.monotonic() - t0}
                    print(task, key, row[key], file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
