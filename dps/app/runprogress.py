"""Progress of a run made of several sampling stages (the demo): one bar over the whole run on a terminal,
redrawn in place on stderr with the stage's name, the steps done and an estimate of the time left. Where stderr
is not a terminal (CI, a pipe, a log file) it draws nothing: the caller logs one line per stage instead."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class RunProgress:
    """Count sampling steps over ``total`` steps; use the instance as a sampler ``callback``."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, width: int = 30,
                 min_interval: float = 0.1):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and total > 0 and self.stream.isatty()
        self.total, self.width, self.min_interval = total, width, min_interval
        self.done, self.stage, self.start, self._last, self._drawn = 0, "", time.monotonic(), 0.0, 0

    def begin(self, stage: str) -> None:
        """Name the stage the next steps belong to."""
        self.stage = stage
        self._draw(force=True)

    def __call__(self, info: dict | None = None) -> None:
        self.done = min(self.done + 1, self.total)
        self._draw(force=self.done == self.total)

    def line(self) -> str:
        """The bar as text: ``[#####.....]  50% stage  100/200 steps  12s, ~12s left``."""
        fraction = self.done / self.total if self.total else 1.0
        filled = int(round(fraction * self.width))
        elapsed = time.monotonic() - self.start
        left = f", ~{elapsed / fraction - elapsed:.0f}s left" if 0 < fraction < 1 else ""
        return (f"[{'#' * filled}{'.' * (self.width - filled)}] {100 * fraction:3.0f}% {self.stage}  "
                f"{self.done}/{self.total} steps  {elapsed:.0f}s{left}")

    def clear(self) -> None:
        """Erase the bar so that a log line can be printed in its place (it is redrawn on the next step)."""
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < self.min_interval):
            return
        self._last = now
        text = self.line()
        self.stream.write("\r" + text + " " * max(self._drawn - len(text), 0))
        self.stream.flush()
        self._drawn = len(text)
