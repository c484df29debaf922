"""A small progress bar (no dependency): redrawn in place on a terminal, a plain line every
10 % otherwise (a log file or a pipe gets lines, never one long line of carriage returns).
Used by ``iotcompress simulate`` and the demo's training runs."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class Progress:
    def __init__(self, total: int, label: str, enabled: bool = True, stream: Optional[TextIO] = None) -> None:
        self.total = max(int(total), 1)
        self.label = label
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self._last_decile = -1
        self._last_draw = 0.0

    def update(self, done: int, info: str = "") -> None:
        if not self.enabled:
            return
        frac = min(done / self.total, 1.0)
        if self.tty:
            now = time.perf_counter()
            if done < self.total and now - self._last_draw < 0.1:
                return
            self._last_draw = now
            width = 24
            bar = "#" * int(frac * width) + "." * (width - int(frac * width))
            self.stream.write(f"\r  {self.label:<38} [{bar}] {done:>5}/{self.total} {info}   ")
            self.stream.flush()
        else:
            decile = int(frac * 10)
            if decile > self._last_decile:
                self._last_decile = decile
                self.stream.write(f"  {self.label:<38} {frac:>4.0%} {done:>5}/{self.total} {info}\n")
                self.stream.flush()

    def close(self, info: str = "") -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        if self.tty:
            self.stream.write("\n")
        self.stream.write(f"  {self.label:<38} done in {elapsed:.1f} s {info}\n")
        self.stream.flush()
