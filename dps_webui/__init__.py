"""Stable Diffusion WebUI (AUTOMATIC1111 and Forge) adapter of DPS Guidance, used by
``scripts/dps_guidance.py``. Host-free: host objects are passed in, never imported, so it is tested
with fakes. The name is unique on purpose: the WebUI puts every extension root on one ``sys.path``.

All submodules are imported here because the WebUI puts the extension root on ``sys.path`` only while
it imports the script; a lazy import later would fail.
"""

from . import hooks, measure, settings
from .hooks import DenoiserWrapper, Job, SigmaClock, post_cfg_function
from .settings import ARG_NAMES, DPSSettings, parse_infotext

__all__ = ["hooks", "measure", "settings", "DenoiserWrapper", "Job", "SigmaClock", "post_cfg_function",
           "ARG_NAMES", "DPSSettings", "parse_infotext"]
