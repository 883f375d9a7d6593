"""A plain-text progress bar for bulk jobs: lines done of total, requests and tokens per
second over the last few seconds (tokens as workers generate them, not only as lines end),
an ETA. One line redrawn in place on a terminal; a line
every `every_s` seconds elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

WINDOW_S = 10.0  # rates are measured over this much recent time
WIDTH = 24  # characters of the bar


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressBar:
    def __init__(
        self,
        label: str,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        every_s: float = 10.0,
    ) -> None:
        self.label, self.clock, self.every_s = label, clock, every_s
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._samples: deque[tuple[float, int, int]] = deque()
        self._last_print = float("-inf")
        self._width = 0

    def rates(self) -> tuple[float, float]:
        """(lines per second, tokens per second) over the window."""
        if len(self._samples) < 2:
            return 0.0, 0.0
        (t0, d0, k0), (t1, d1, k1) = self._samples[0], self._samples[-1]
        if t1 <= t0:
            return 0.0, 0.0
        return (d1 - d0) / (t1 - t0), (k1 - k0) / (t1 - t0)

    def render(self, status) -> str:
        """One line for a `JobStatus`."""
        total = max(1, status.total)
        filled = int(WIDTH * min(status.done, total) / total)
        bar = "#" * filled + "-" * (WIDTH - filled)
        per_s, tokens_per_s = self.rates()
        left = status.total - status.done
        eta = format_duration(left / per_s) if per_s > 0 else "?" if left else format_duration(0)
        text = (
            f"{self.label} [{bar}] {status.done}/{status.total} lines "
            f"{per_s:.1f} req/s {tokens_per_s:.0f} tok/s ETA {eta}"
        )
        if status.submitted < status.total:
            text += f" (queued {status.submitted})"
        if status.errors:
            text += f" ({status.errors} errors)"
        return text

    def update(self, status, final: bool = False) -> None:
        now = self.clock()
        self._samples.append((now, status.done, status.tokens_so_far))
        while len(self._samples) > 2 and now - self._samples[0][0] > WINDOW_S:
            self._samples.popleft()
        if self.interactive:
            line = self.render(status)
            pad = max(0, self._width - len(line))
            self._width = len(line)
            self.stream.write("\r" + line + " " * pad + ("\n" if final else ""))
        elif final or now - self._last_print >= self.every_s:
            self.stream.write(self.render(status) + "\n")
            self._last_print = now
        self.stream.flush()

    def close(self, status) -> None:
        self.update(status, final=True)
