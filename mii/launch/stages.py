"""What `mii.serve` tells its caller while it starts a deployment, one line a stage, on
stderr: which Redis (password redacted) and DB, the model's fetch and conversion (their
progress bars print beside), the workers and where their logs are, each worker loading,
ready. A first run of the demo model spends a minute fetching and converting it: this is
where the user sees it happen."""

from __future__ import annotations

import os
import sys
import time
from typing import TextIO

from mii.broker_config.deployment import READY
from mii.broker_config.settings import REDIS_URL_ENV, redact_url

STILL_LOADING_EVERY_S = 15.0


class Stages:
    def __init__(self, deployment: str, stream: TextIO | None = None) -> None:
        self.deployment = deployment
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.monotonic()
        self._seen: dict[int, str] = {}  # replica -> last state told
        self._last_news = self.started

    def say(self, text: str) -> None:
        print(f"mii.serve {self.deployment}: {text}", file=self.stream, flush=True)

    # ---- the stages ---------------------------------------------------------------------
    def redis(self, url: str, db: int, how: str) -> None:
        """`how`: "given", "default" (one answered at the default address) or "embedded"."""
        where = f"Redis {redact_url(url)}, DB {db}"
        if how == "embedded":
            self.say(f"{where}: an embedded redis-server started for this deployment (it "
                     "stops with it)")  # fmt: skip
        elif how == "default":
            self.say(f"{where}: the Redis answering at the default address (choose another "
                     f"with redis_url= or {REDIS_URL_ENV}; a DB with the URL's /N)")  # fmt: skip
        else:
            self.say(f"{where}")

    def model(self, text: str) -> None:
        self.say(f"model: {text}")

    def workers(self, count: int, log_dir: str) -> None:
        self.say(f"starting {count} worker(s); logs in {log_dir}{os.sep}")

    def waiting(self, workers: list, statuses: dict[int, dict]) -> None:
        """While the launcher waits: each worker's state as it changes, and now and then a
        line that it still loads. `statuses`: pid -> the worker's reported status."""
        for worker in workers:
            state = statuses.get(worker.pid, {}).get("state", "launching")
            if self._seen.get(worker.replica) != state:
                self._seen[worker.replica] = state
                self._last_news = time.monotonic()
                self.say(f"worker replica {worker.replica} (pid {worker.pid}): {_words(state)}")
        if time.monotonic() - self._last_news >= STILL_LOADING_EVERY_S:
            self._last_news = time.monotonic()
            slow = [w for w in workers if self._seen.get(w.replica) != READY]
            if slow:
                self.say(f"still starting after {self.elapsed():.0f}s (tail -f "
                         f"{slow[0].log_path})")  # fmt: skip

    def ready(self, count: int) -> None:
        self.say(f"ready: {count} worker(s) after {self.elapsed():.1f}s")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


def _words(state: str) -> str:
    return {
        "launching": "launching (python, torch, celery)",
        "starting": "loading the model",
        READY: "ready",
    }.get(state, state)
