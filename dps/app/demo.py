"""``python -m dps demo``: the embedded priors restore held-out digits on every task.

For each task: simulate y = A(x) + n (Gaussian, σ = 0.05 on [-1, 1]) from held-out digits, restore with
DPS (DDPM, respaced), and compare with the best simple baseline and with unguided sampling from the same
prior and seed. Step settings per task are those tuned on other held-out digits (``bench/tune_demo.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import DPSGuidance
from ..noise import Gaussian
from ..operators import Operator
from ..validate import check_int
from .baselines import candidates
from .data import digits_rgb, heldout_digits
from .grid import Cell, labelled_grid
from .metrics import psnr, ssim
from .prior import Prior, load_prior
from .runprogress import RunProgress
from .sampler import draw
from .tasks import TASKS, make_operator
from .tuned import guidance_for


@dataclass
class DemoSettings:
    images: int = 16
    steps: int = 200
    seed: int = 0
    sigma: float = 0.05
    tasks: tuple[str, ...] = TASKS
    latent: bool = False
    vae: str | None = None
    model: str | None = None
    offset: int = 0
    guidance: dict[str, tuple[str, float]] = field(default_factory=dict)
    sampler: str = "ddpm"                    # dps.app.sampler.SAMPLERS


@dataclass
class Setup:
    prior: Prior
    truth: torch.Tensor                      # images in [-1, 1]
    decoder: Callable[[torch.Tensor], torch.Tensor] | None


def load_setup(s: DemoSettings) -> Setup:
    check_int("images", s.images, minimum=1, fix="the number of held-out digits per task")
    check_int("offset", s.offset, minimum=0)
    check_int("steps", s.steps, minimum=1, maximum=1000)
    kind = "latent" if s.latent else "pixel"
    prior = load_prior(s.model, kind)
    if prior.kind != kind:
        raise ValueError(f"{s.model} is a {prior.kind} prior; {'add' if prior.kind == 'latent' else 'leave out'} "
                         "--latent, or pass a matching --model")
    digits = heldout_digits()
    if s.offset + s.images > len(digits):
        raise ValueError(f"only {len(digits)} held-out digits; ask for fewer images")
    truth = digits[s.offset:s.offset + s.images]
    decoder = None
    if kind == "latent":
        if s.vae is None:
            raise ValueError("the latent prior needs a TAESD decoder for SD1.x: --vae PATH/taesd_decoder.safetensors "
                             "(ComfyUI keeps it in models/vae_approx/)")
        from .models.taesd import load_taesd

        vae = load_taesd(s.vae, "decoder")
        if vae[1].in_channels != prior.shape[0]:
            raise ValueError(f"{s.vae} decodes {vae[1].in_channels}-channel latents but the prior has "
                             f"{prior.shape[0]}; use the SD1.x TAESD decoder (taesd_decoder.safetensors)")
        decoder = lambda z: vae(z) * 2 - 1  # noqa: E731  TAESD decodes to [0, 1]
        truth = digits_rgb(truth)
    return Setup(prior, truth, decoder)


def sample(setup: Setup, s: DemoSettings, guidance: DPSGuidance | None,
           progress: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Sample from the prior with ``s.sampler`` (guided when ``guidance`` is given; the unguided sample is DDPM's);
    ``progress`` is called after every step."""
    shape = (len(setup.truth), *setup.prior.shape)
    z = draw(setup.prior, shape, s.steps, guidance, s.sampler, seed=s.seed + 1, clip_x0=setup.decoder is None,
             callback=progress)
    with torch.no_grad():
        return (setup.decoder(z) if setup.decoder is not None else z).clamp(-1, 1)


def measure(task: str, truth: torch.Tensor, s: DemoSettings) -> tuple[Operator, torch.Tensor]:
    op = make_operator(task, tuple(truth.shape), seed=s.seed)
    y = Gaussian(s.sigma).sample(op(truth), torch.Generator().manual_seed(s.seed + 2))
    return op, y


def run(s: DemoSettings, log: Callable[[str], None] = lambda m: None, show_progress: bool = False) -> dict:
    """Run the demo; return {"tasks": {task: {"dps", "baseline", "unguided", ...}}, ...} and the images.

    ``show_progress``: one bar over the whole run when stderr is a terminal; ``log`` gets one line per task."""
    start = time.monotonic()
    setup = load_setup(s)
    kind = "latent" if s.latent else "pixel"
    bar = RunProgress((1 + len(s.tasks)) * s.steps, enabled=show_progress)
    say = log

    def log(message: str) -> None:  # the bar is erased for the line and redrawn on the next step
        bar.clear()
        say(message)

    log(f"{kind} prior, {len(setup.truth)} held-out digits, {s.steps} steps ({s.sampler}), Gaussian noise "
        f"σ = {s.sigma}; {len(s.tasks)} tasks after one unguided run")
    bar.begin("unguided")
    unguided = sample(setup, s, None, bar)
    results, images = {}, {}
    for task in s.tasks:
        op, y = measure(task, setup.truth, s)
        rule, zeta = s.guidance.get(task) or guidance_for(kind, task, s.steps, s.sampler)
        guidance = DPSGuidance(op, Gaussian(s.sigma), y, zeta=zeta, rule=rule, decoder=setup.decoder)
        t0 = time.monotonic()
        bar.begin(task)
        dps = sample(setup, s, guidance, bar)
        base = candidates(op, y, torch.Generator().manual_seed(s.seed))
        scores = {name: float(psnr(b, setup.truth).mean()) for name, b in base.items()}
        best = max(scores, key=scores.get)
        results[task] = {
            "dps": float(psnr(dps, setup.truth).mean()), "baseline": scores[best],
            "unguided": float(psnr(unguided, setup.truth).mean()), "baseline_name": best,
            "ssim": {"dps": float(ssim(dps, setup.truth).mean()), "baseline": float(ssim(base[best], setup.truth).mean()),
                     "unguided": float(ssim(unguided, setup.truth).mean())},
            "rule": rule, "zeta": round(zeta, 4), "seconds": round(time.monotonic() - t0, 1)}
        images[task] = [display_measurement(y, setup.truth.shape), base[best], unguided, dps, setup.truth]
        r = results[task]
        log(f"{task:18s} PSNR  DPS {r['dps']:5.2f}  {best} {r['baseline']:5.2f}  unguided {r['unguided']:5.2f}  "
            f"[{r['seconds']:.0f}s]")
    return {"tasks": results, "prior": kind, "images": len(setup.truth), "steps": s.steps, "sampler": s.sampler,
            "sigma": s.sigma,
            "seconds": round(time.monotonic() - start, 1), "_images": images}


def display_measurement(y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The measurement shown at image size: upsampled, or the log-amplitude spectrum for phase retrieval."""
    if y.shape[-2:] == shape[-2:]:
        out = y
    elif y.shape[-1] < shape[-1]:
        out = F.interpolate(y, size=shape[-2:], mode="nearest")
    else:
        mag = torch.log1p(y.clamp_min(0))
        mag = mag / mag.flatten(1).amax(1).view(-1, 1, 1, 1).clamp_min(1e-6) * 2 - 1
        out = F.interpolate(mag, size=shape[-2:], mode="bilinear", antialias=True)
    return out.expand(-1, shape[1], -1, -1) if out.shape[1] != shape[1] else out


ROW_LABELS = ("measurement", "baseline", "DPS", "truth")


def grid(result: dict, images: dict[str, list[torch.Tensor]], per_task: int = 3) -> torch.Tensor:
    """The labelled grid of a demo run (``run``'s result and its ``"_images"``): one column group per task, named
    on top; rows measurement | best baseline | DPS | truth, with the mean PSNR over all the run's digits under
    the baseline (and its name) and DPS rows."""
    groups = {}
    for task, (measurement, baseline, _unguided, dps, truth) in images.items():
        r = result["tasks"][task]
        groups[task.replace("_", " ")] = [
            Cell(measurement), Cell(baseline, f"{r['baseline_name']} {r['baseline']:.1f} dB"),
            Cell(dps, f"DPS {r['dps']:.1f} dB"), Cell(truth)]
    title = (f"DPS demo, {result['prior']} prior: {result['images']} held-out digits, {result['steps']} steps, "
             f"noise sigma {result['sigma']}; PSNR = mean over the {result['images']} digits")
    return labelled_grid(groups, list(ROW_LABELS), per_group=per_task, title=title)
