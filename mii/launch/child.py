"""A child process that `mii.serve` starts (a worker, the gateway, an embedded Redis): its
log, its exit, and stopping it (SIGTERM, then SIGKILL after a timeout)."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class ChildProcess:
    process: subprocess.Popen
    log_path: str

    @property
    def pid(self) -> int:
        return self.process.pid

    def exit_code(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 30) -> str:
        return log_tail(self.log_path, lines)

    def stop(self, timeout_s: float = 10.0) -> None:
        stop_all([self], timeout_s)


def stop_all(children: list[ChildProcess], timeout_s: float) -> None:
    """SIGTERM every child (workers drain), then SIGKILL whoever is still there after the
    timeout."""
    for child in children:
        if child.exit_code() is None:
            child.process.terminate()
    deadline = time.monotonic() + timeout_s
    for child in children:
        try:
            child.process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.process.kill()
            child.process.wait()


def log_tail(path: str, lines: int = 30) -> str:
    """The last lines of a log, or "(no log)"."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])
