"""DPS Guidance: Diffusion Posterior Sampling (Chung et al., ICLR 2023) for any diffusion sampler.

Conventions, stated once: images are NCHW float batches in **[-1, 1]** (the paper's range), so noise
levels such as the paper's ``sigma = 0.05`` are on that range (0.025 on [0, 1]). Masks use 1 = missing.

The package imports torch only; it never imports a host (ComfyUI, the WebUI). This is the guidance core
(operators, noise models, the guidance step, samplers, schedules, host glue); the demo application (embedded
priors, training, restore, command line) lives on top of it in ``dps.app`` and is never imported from here.
"""

from . import noise, operators, rules
from .guidance import MODES, RULES, DPSGuidance, GuidanceDivergedError
from .host import guided_denoised
from .noise import Gaussian, Noiseless, Poisson
from .operators import LinearOperator, Operator, SuperResolution
from .proximal import proximal_step
from .sampling import ddim_sample, ddpm_sample, euler_sample, heun_sample, proximal_sample
from .schedule import alphas_cumprod_from_betas, linear_betas, respace, sigma_from_alpha_cumprod

__version__ = "0.1.0"
__all__ = [
    "operators", "noise", "rules", "DPSGuidance", "GuidanceDivergedError", "RULES", "MODES", "__version__",
    "Gaussian", "Noiseless", "Poisson", "Operator", "LinearOperator", "SuperResolution",
    "ddpm_sample", "ddim_sample", "euler_sample", "heun_sample", "guided_denoised", "proximal_sample", "proximal_step",
    "linear_betas", "alphas_cumprod_from_betas", "sigma_from_alpha_cumprod", "respace",
]
