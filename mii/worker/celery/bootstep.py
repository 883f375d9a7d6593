"""The Celery worker bootstep that hosts the engine loop on its own thread.

`start` builds the engine in the worker process (CUDA initialised here, after any fork
Celery might do, and never forked after: the pool is `solo`), then runs the loop on a
thread; `stop` (warm shutdown, SIGTERM) drains it, `shutdown` (cold) hands work back.
`info` is what `celery inspect stats` and Flower's worker page show.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time

from celery import bootsteps
from celery.platforms import EX_FAILURE

from mii.worker.celery.events import PREVIEW, TaskEvents

log = logging.getLogger("mii.worker")
EXIT_CODE_ATTR = "mii_exit_code"


def _prompt_chars(option: str | int | None) -> int | None:
    """`--task-prompt-chars`: a count, "none" for whole prompts; not given: the default."""
    if option is None:
        return PREVIEW
    return None if str(option).lower() == "none" else int(option)


class EngineLoopStep(bootsteps.StartStopStep):
    label = "mii engine loop"

    def __init__(self, worker, deployment=None, replica=0, engine_factory=None,
                 metrics_port=None, metrics_address=None, task_prompt_chars=None,
                 **kwargs):  # fmt: skip
        super().__init__(worker, **kwargs)
        self.deployment, self.replica = deployment, int(replica or 0)
        self.engine_factory, self.metrics_port = engine_factory, metrics_port
        self.metrics_address = metrics_address
        self.prompt_chars = _prompt_chars(task_prompt_chars)
        self.hosted = None
        self.events: TaskEvents | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.failed = False
        self.started_at = time.monotonic()
        worker.mii_step = self

    def start(self, worker) -> None:
        if not self.deployment:
            log.warning("no --deployment given: this worker serves no mii deployment")
            return
        from mii.worker.hosting import build_worker

        self.events = TaskEvents(worker.app, worker.hostname, self.prompt_chars)
        url = worker.app.conf.get("mii_redis_url") or worker.app.conf.broker_url
        self.hosted = build_worker(
            self.deployment, url, self.replica, self.engine_factory,
            observer=self.events,
        )  # fmt: skip
        if self.metrics_port:
            from mii.worker.celery.metrics import serve_metrics

            serve_metrics(self, int(self.metrics_port), self.metrics_address)
        self.thread = threading.Thread(target=self._run, name="mii-engine-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.hosted.loop.run()
        except BaseException:
            log.exception("engine loop failed: shutting the worker down")
            self.failed = True  # the worker exits non-zero, so supervisors restart it
        if not self.stopping:
            # The loop ended on its own (terminate, failure): the worker has nothing left to
            # host, so it leaves through Celery's warm shutdown like on SIGTERM.
            os.kill(os.getpid(), signal.SIGTERM)

    @property
    def loop(self):
        return None if self.hosted is None else self.hosted.loop

    def stop(self, worker) -> None:
        """Warm shutdown: stop reading, finish in-flight work (bounded), hand back the rest."""
        self.stopping = True
        if self.loop is not None:
            self.loop.drain()
            self._join(self.loop.settings.drain_timeout_s + 10)
        if self.failed:
            setattr(worker.app, EXIT_CODE_ATTR, EX_FAILURE)  # what `mii worker` exits with

    def shutdown(self, worker) -> None:
        self.stopping = True
        if self.loop is not None:
            self.loop.stop()
            self._join(30)
            self.hosted.close()
        if self.events is not None:
            self.events.close()

    def _join(self, timeout_s: float) -> None:
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout_s)

    def info(self, worker) -> dict:
        return {"mii": self.statistics()}

    def statistics(self) -> dict:
        """Engine and loop statistics, with tokens/s over the worker's lifetime."""
        loop = self.loop
        if loop is None:
            return {"deployment": self.deployment, "state": "not serving"}
        engine = loop.engine.stats()
        engine = dataclasses.asdict(engine) if dataclasses.is_dataclass(engine) else {}
        uptime = max(time.monotonic() - self.started_at, 1e-9)
        published = loop.publisher.tokens_published
        return {
            "deployment": self.deployment,
            "replica": self.replica,
            "state": "paused" if loop.paused else ("draining" if loop.draining else "serving"),
            "engine": engine,
            "loop": loop.stats.as_dict(),
            "active_requests": len(loop.active),
            "queued_in_worker": len(loop.held.backlog),
            "tokens_published": published,
            "tokens_per_s": published / uptime,
            "queue_depth": _queue_depth(loop),
        }


def _queue_depth(loop) -> dict:
    try:
        depths: dict[str, int] = {}
        for stream in loop.keys.request_streams():  # partitions add up as "requests"
            name = stream.rsplit(":", 1)[-1]
            depths[name] = depths.get(name, 0) + loop.redis.xlen(stream)
        return depths
    except Exception:  # noqa: BLE001 (statistics must not fail on a Redis hiccup)
        return {}
