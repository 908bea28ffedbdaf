"""Installer hook of the Stable Diffusion WebUI (AUTOMATIC1111 and Forge), which runs it before every start.

Inside the WebUI it installs what DPS Guidance needs and the WebUI lacks, through the WebUI's own ``launch``
helpers only (``launch.is_installed``, ``launch.run_pip``, which respect ``--skip-install``). It never installs
torch: the host's build (CUDA, ROCm, MPS or CPU) is kept.

Anywhere else it installs nothing and starts no process: ComfyUI (its Manager, the registry, ``comfy node
install``) installs ``requirements.txt`` itself, and a plain checkout is set up with ``pip`` as the README says.
"""

from __future__ import annotations

import sys
from types import ModuleType

# Distribution name -> pip requirement. torch is deliberately absent: the host brings its own build.
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "einops": "einops>=0.7", "numpy": "numpy>=1.24"}


def missing(launch: ModuleType) -> list[str]:
    """The requirements the WebUI does not have yet, by its own ``launch.is_installed``."""
    return [req for name, req in REQUIREMENTS.items() if not launch.is_installed(name)]


def install(launch: ModuleType) -> list[str]:
    """Install the missing requirements with ``launch.run_pip``; return what was asked for."""
    needed = missing(launch)
    if needed:
        launch.run_pip("install " + " ".join(f'"{r}"' for r in needed), "requirements for DPS Guidance")
    return needed


def host_launch() -> ModuleType | None:
    """The WebUI's ``launch`` module (importable when the WebUI runs this file), or None elsewhere."""
    try:
        import launch
    except ImportError:
        return None
    return launch if hasattr(launch, "run_pip") and hasattr(launch, "is_installed") else None


def main() -> int:
    launch = host_launch()
    if launch is None:
        print("DPS Guidance: nothing to install here. ComfyUI installs requirements.txt itself; elsewhere run "
              "`pip install -r requirements.txt` (torch first, the build for your hardware).", file=sys.stderr)
        return 0
    install(launch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
