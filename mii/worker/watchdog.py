"""A stuck engine step ends the worker process, so that its supervisor restarts it.

An engine step that never returns (a GPU kernel that spins forever, a tensor-parallel rank
that stopped answering inside a collective) blocks the worker loop's thread, and nothing in
that thread can end it: the call sits in the CUDA driver. The loop's heartbeats stop with
it, so live workers reclaim its requests after a while, but the process itself would hold
its GPU, its memory and its place in the fleet forever.

`StepWatchdog` is a daemon thread that looks at the step in progress once a second. When
one has run longer than `broker.step_timeout_s`, it calls `on_stuck` (the loop reports the
worker failed, best effort: at most REPORT_WAIT_S, a Redis that does not answer cannot
hold the exit back), logs every thread's stack (the worker's log), and exits the process
at once with a non-zero code: a clean shutdown would wait on the stuck thread. The
supervisor restarts the worker; its requests are reclaimed by live workers and
resume from what they published, and a request that hangs the engine every time it runs is
dead-lettered after `max_deliveries`, as one that crashes it is (worker/fault.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
EXIT_STUCK = 1
"""The process's exit code: a failure, as `mii worker` exits after a broken engine."""
REPORT_WAIT_S = 5.0


def thread_stacks() -> str:
    """Where every thread of the process is (the stuck step's among them)."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(
        f"thread {names.get(ident, ident)}:\n{''.join(traceback.format_stack(frame))}"
        for ident, frame in sys._current_frames().items()
    )


def _exit_now() -> None:
    try:
        log.critical("stacks of the stuck worker:\n%s", thread_stacks())
        for handler in logging.getLogger().handlers:
            handler.flush()
    finally:
        os._exit(EXIT_STUCK)


class StepWatchdog:
    """Watches the engine steps run inside `stepping()`; None or 0 seconds: never fires."""

    def __init__(
        self,
        timeout_s: float | None,
        on_stuck: Callable[[float], None] = lambda elapsed: None,
        exit_process: Callable[[], None] = _exit_now,
        poll_s: float = 1.0,
    ) -> None:
        self.timeout_s = timeout_s
        self.on_stuck = on_stuck
        self.exit_process = exit_process
        self.poll_s = poll_s
        self._since: float | None = None  # monotonic start of the step in progress
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.timeout_s and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="mii-step-watchdog",
                                            daemon=True)  # fmt: skip
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def stepping(self) -> Iterator[None]:
        self._since = time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            since = self._since
            if since is None:
                continue
            elapsed = time.monotonic() - since
            if elapsed > self.timeout_s:
                self._fire(elapsed)
                return

    def _fire(self, elapsed: float) -> None:
        log.critical("an engine step has run for %.0fs (broker.step_timeout_s %s): the engine "
                     "is stuck; ending the worker so that its supervisor restarts it",
                     elapsed, self.timeout_s)  # fmt: skip
        report = threading.Thread(target=self._report, args=(elapsed,), daemon=True)
        report.start()
        report.join(REPORT_WAIT_S)
        self.exit_process()

    def _report(self, elapsed: float) -> None:
        try:
            self.on_stuck(elapsed)
        except Exception:  # noqa: BLE001 (the exit must happen whatever this does)
            log.exception("reporting the stuck engine failed")
