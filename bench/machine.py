"""The machine a benchmark ran on, as its ``--json`` output records it (shared by the bench scripts)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(threads: int) -> dict:
    """Python, torch, machine, CPU model and count, and the torch threads the benchmark used."""
    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": cpu_name(), "cpus": os.cpu_count(), "threads": threads}
