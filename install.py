"""Install what DPS Guidance needs and the host lacks. Run by ComfyUI-Manager and by the WebUI.

It never installs or upgrades torch: the host's build (CUDA, ROCm, MPS or CPU) is kept. Each other
requirement is installed only when it cannot be imported. Works with or without the WebUI's
``launch`` module.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

# import name -> pip requirement (torch deliberately absent)
REQUIREMENTS = {"safetensors": "safetensors>=0.4", "einops": "einops>=0.7", "numpy": "numpy>=1.24"}


def missing() -> list[str]:
    return [req for name, req in REQUIREMENTS.items() if importlib.util.find_spec(name) is None]


def install(requirements: list[str]) -> None:
    if not requirements:
        return
    try:
        import launch  # the WebUI's installer helpers, when run inside the WebUI
    except ImportError:
        launch = None
    if launch is not None and hasattr(launch, "run_pip"):
        launch.run_pip("install " + " ".join(f'"{r}"' for r in requirements), "DPS Guidance requirements")
        return
    subprocess.check_call([sys.executable, "-m", "pip", "install", *requirements])


def main() -> None:
    if importlib.util.find_spec("torch") is None:
        print("DPS Guidance: torch is not installed. Install the build for your GPU from pytorch.org first; "
              "this installer never installs torch itself.", file=sys.stderr)
    install(missing())


if __name__ == "__main__" or "launch" in sys.modules:
    main()
