"""DPS Guidance: Diffusion Posterior Sampling (Chung et al., ICLR 2023) for any diffusion sampler.

Conventions, stated once: images are NCHW float batches in **[-1, 1]** (the paper's range), so noise
levels such as the paper's ``sigma = 0.05`` are on that range (0.025 on [0, 1]). Masks use 1 = missing.

The package imports torch only; it never imports a host (ComfyUI, the WebUI).
"""

from . import noise, operators
from .guidance import MODES, RULES, DPSGuidance, GuidanceDivergedError

__version__ = "0.1.0"
__all__ = ["operators", "noise", "DPSGuidance", "GuidanceDivergedError", "RULES", "MODES", "__version__"]
