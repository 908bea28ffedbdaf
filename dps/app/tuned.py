"""The demo application's tuned guidance defaults: (rule, zeta) per prior and task, shared by ``demo`` and
``restore``."""

from __future__ import annotations

from ..rules import get_rule
from .tasks import TASKS

# (rule, zeta, reference steps) per task and prior. Pixel: tuned on held-out digits 50-57 at 200 steps by
# `python bench/tune_demo.py --images 8 --steps 200 --rules dps` (the demo reports digits 0-49): ζ = 3 was
# best on five tasks, ζ = 1 on phase retrieval. Latent: ζ = 0.1 at 100 steps from bench/restore.py's strength
# check at 50 steps (best 0.1-0.3); super-resolution ζ = 0.3 from `python bench/tune_demo.py --latent --vae
# PATH --images 4 --steps 100 --tasks super_resolution --rules dps` (27.0 dB vs 23.2 at 1). With the constant rule the total guidance is ζ x steps, so ζ is
# rescaled by reference_steps / steps when another step count is asked for (``guidance_for``).
GUIDANCE = {
    "pixel": {**{task: ("dps", 3.0, 200) for task in TASKS}, "phase_retrieval": ("dps", 1.0, 200)},
    "latent": {**{task: ("dps", 0.1, 100) for task in TASKS}, "super_resolution": ("dps", 0.3, 100)},
}
DEFAULT_STEPS = {"pixel": 200, "latent": 100}
# The proximal sampler (``dps.app.sampler``): the rule "proximal" at ζ = 1 (λ = dps.proximal.LAMBDA, chosen on the
# tuning digits 50-57 by `python bench/few_steps.py --offset 50 --official-steps 0 --steps 30 --samplers proximal
# --lam 0.1,0.3,1,3`) on every task and prior, 30 steps (bench/README.md, *The proximal data step*).
PROXIMAL = ("proximal", 1.0)
PROXIMAL_STEPS = 30
# The fewest DDPM steps demo and restore accept. Fewer give noise: the constant rule's ζ, rescaled by
# reference_steps / steps, leaves the range it was tuned in (600 at 1 step). Restoring 4 held-out digits (σ = 0.05)
# with the pixel prior, mean PSNR (dB) at 1/5/10/20/50 steps: super-resolution x4 7.6/11.9/13.5/18.5/18.3,
# Gaussian deblur 7.4/6.9/13.1/17.1/21.2.
MIN_STEPS = 10
TUNING_OFFSET = 50


def guidance_for(kind: str, task: str, steps: int, sampler: str = "ddpm") -> tuple[str, float]:
    """The default (rule, zeta) for ``steps`` sampling steps of ``sampler`` (``dps.app.sampler``)."""
    if sampler == "proximal":
        return PROXIMAL
    rule, zeta, reference = GUIDANCE[kind].get(task, ("dps", 1.0, steps))
    return rule, (zeta * reference / steps if get_rule(rule).scales_with_steps else zeta)
