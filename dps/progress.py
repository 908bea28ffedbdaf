"""Progress: the sampling progress guidance's start/end window is read on, and a progress bar for long runs.

Sampling progress runs from 0 at the first step to 1 at the last. Samplers that count their steps use
``step_progress``; adapters that see only the noise level a denoiser is called with (the hosts) use
``sigma_progress``, in log σ between the schedule's ends.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def step_progress(i: int, n: int) -> float:
    """Progress of step ``i`` (0-based) of ``n``: 0 at the first step, 1 at the last."""
    return i / max(n - 1, 1)


def sigma_progress(sigma: float, top: float, bottom: float | None) -> float:
    """Progress of noise level ``sigma`` in log σ from ``top`` (0, the first step) to ``bottom`` (1, the
    smallest positive σ), clamped to [0, 1]; without a usable span (no or a non-positive ``bottom``,
    ``top <= bottom``, or σ <= 0) 0 at or above ``top`` and 1 below it."""
    if bottom is None or bottom <= 0 or top <= bottom or sigma <= 0:
        return 0.0 if sigma >= top else 1.0
    progress = (math.log(top) - math.log(max(sigma, bottom))) / (math.log(top) - math.log(bottom))
    return min(max(progress, 0.0), 1.0)


def progress_bar(items: Iterable[T], total: int, enabled: bool = True, desc: str = "") -> Iterator[T]:
    """Yield ``items``, drawing progress on stderr when ``enabled`` and stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield from items
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        yield from _plain(items, total, desc)
        return
    yield from tqdm(items, total=total, desc=desc, leave=False, file=sys.stderr)


def _plain(items: Iterable[T], total: int, desc: str) -> Iterator[T]:
    start = time.monotonic()
    every = max(total // 20, 1)
    for i, item in enumerate(items, 1):
        yield item
        if i % every == 0 or i == total:
            elapsed = time.monotonic() - start
            sys.stderr.write(f"\r{desc} {i}/{total} [{elapsed:5.1f}s]")
            sys.stderr.flush()
    sys.stderr.write("\n")
