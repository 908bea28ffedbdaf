"""A progress bar for long runs: tqdm when it is installed, otherwise a plain one on stderr."""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


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
