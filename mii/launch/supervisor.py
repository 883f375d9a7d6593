"""Supervision of the worker processes `mii.serve` started, on a thread of the serving process.

A worker that exits while its deployment serves is logged, its status in the workers hash
becomes EXITED at once (so live workers reclaim its requests without waiting for its
heartbeat to age), and it is started again after a backoff (1 s, 2 s, 4 s ... capped). A
deployment whose workers needed more than `worker_restarts_per_minute` restarts in a
minute is declared failed in `keys.state` (with the last worker's log tail): nothing is
restarted any more, and clients get `DeploymentFailedError` once no worker is left.
Workers that exit because the deployment is being terminated are not restarted.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections import deque

from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.broker_config.deployment import (
    FAILED,
    TERMINATING,
    DeploymentRecord,
    live_workers,
    load_record,
    mark_exited,
    read_state,
    set_state,
)
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings
from mii.errors import DeploymentNotFoundError
from mii.launch.embedded_redis import EmbeddedRedis
from mii.launch.processes import WorkerProcess, WorkerSpec

log = logging.getLogger(__name__)
POLL_S = 0.2
FIRST_RESTART_DELAY_S, MAX_RESTART_DELAY_S = 1.0, 60.0
WINDOW_S = 60.0
"""The restart limit counts restarts over this long; a worker that ran this long before it
exited restarts after the shortest delay again."""


class Supervisor:
    def __init__(
        self,
        redis,
        keys: DeploymentKeys,
        settings: BrokerSettings,
        record: DeploymentRecord,
        spec: WorkerSpec,
        workers: list[WorkerProcess],
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        """`record`: what the launcher recorded; `workers` is the launcher's list: a
        restarted replica replaces its entry; `embedded`: the deployment's own Redis, if
        the launcher started it (it stops only when the deployment is terminated)."""
        self.redis, self.keys, self.settings, self.spec = redis, keys, settings, spec
        self.record, self.embedded = record, embedded
        self.workers = workers
        self.failure: str | None = None
        """Why the deployment failed, once it did."""
        self._backoffs = {w.replica: Backoff(FIRST_RESTART_DELAY_S, MAX_RESTART_DELAY_S)
                          for w in workers}  # fmt: skip
        self._restarts: deque[float] = deque()  # monotonic times, the last WINDOW_S
        self._due: dict[int, float] = {}  # replica -> monotonic time of its restart
        self._handled: set[int] = set()  # pids whose exit was dealt with
        self._ending = False  # the deployment is being terminated
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mii-supervisor", daemon=True)

    def start(self) -> Supervisor:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop supervising (before the launcher stops the workers itself)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)

    @property
    def finished(self) -> bool:
        """Nothing left to supervise: the deployment ended (terminated, or failed with no
        live worker anywhere) and every process started here exited."""
        return not self._thread.is_alive()

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(timeout_s)
        return self.finished

    # ---- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        unreachable = False
        while not self._stop.wait(POLL_S):
            try:
                if self._tick():
                    return
                unreachable = False
            except CONNECTION_ERRORS as exc:
                if not unreachable:  # once per outage
                    log.warning("supervisor: Redis unreachable (%s); retrying", exc)
                unreachable = True
            except Exception:  # noqa: BLE001 (supervision must outlive any one failure)
                log.exception("supervisor of %s: retrying", self.keys.deployment)

    def _tick(self) -> bool:
        """One look at the processes; True when there is nothing left to supervise."""
        exited = [w for w in self.workers if w.exit_code() is not None]
        exited = [w for w in exited if w.pid not in self._handled]
        if exited and not self._ending:
            self._ending = self._deployment_ending()
        for worker in exited:
            self._on_exit(worker)
        self._restart_due()
        return self._nothing_left()

    def _deployment_ending(self) -> bool:
        """Terminated, its record gone (a restarted worker could not start anyway), or the
        name now belongs to a new deployment (terminated, then served again)."""
        if self.embedded is not None and not self.embedded.running():
            return True  # terminated from another process, which stopped it
        try:
            record = load_record(self.redis, self.keys)
        except DeploymentNotFoundError:
            return True
        state = read_state(self.redis, self.keys).get("state")
        return record.created != self.record.created or state == TERMINATING

    def _on_exit(self, worker: WorkerProcess) -> None:
        code = worker.exit_code()
        if self._ending or self._stop.is_set():
            log.info("worker replica %d (pid %d) stopped: code %s", worker.replica, worker.pid,
                     code)  # fmt: skip
            self._handled.add(worker.pid)
            return
        mark_exited(self.redis, self.keys, socket.gethostname(), worker.pid, code)
        log.warning(
            "worker replica %d (pid %d) of %s exited with code %s; last lines of %s:\n%s",
            worker.replica, worker.pid, self.keys.deployment, code, worker.log_path,
            worker.log_tail(),
        )  # fmt: skip
        if self.failure is None:
            self._schedule_restart(worker, code)
        self._handled.add(worker.pid)  # last: a Redis error above retries it next tick

    def _schedule_restart(self, worker: WorkerProcess, code: int | None) -> None:
        now = time.monotonic()
        while self._restarts and self._restarts[0] < now - WINDOW_S:
            self._restarts.popleft()
        if len(self._restarts) >= self.settings.worker_restarts_per_minute:
            self._fail(worker, code)
            return
        backoff = self._backoffs[worker.replica]
        if now - worker.started > WINDOW_S:
            backoff.reset()
        delay = backoff.next_delay()
        self._due[worker.replica] = now + delay
        log.warning("restarting worker replica %d in %.1fs", worker.replica, delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        due = [replica for replica, at in self._due.items() if at <= now]
        if not due:
            return
        if self._deployment_ending():
            self._ending = True
            self._due.clear()
            return
        for replica in due:
            index = next(i for i, w in enumerate(self.workers) if w.replica == replica)
            self.workers[index] = self.spec.spawn(replica)
            del self._due[replica]
            self._restarts.append(now)
            log.warning("restarted worker replica %d: pid %d", replica, self.workers[index].pid)

    def _fail(self, worker: WorkerProcess, code: int | None) -> None:
        limit = self.settings.worker_restarts_per_minute
        failure = (
            f"worker replica {worker.replica} exited with code {code} after {limit} "
            f"restart(s) in a minute (worker_restarts_per_minute={limit}); last lines of "
            f"{worker.log_path}:\n{worker.log_tail()}"
        )
        set_state(self.redis, self.keys, FAILED, error=failure)
        self.failure = failure
        log.error("deployment %s failed: %s", self.keys.deployment, failure)

    def _nothing_left(self) -> bool:
        if self._due or any(w.exit_code() is None for w in self.workers):
            return False
        if self._ending:
            return True
        dead_after = self.settings.dead_after_s
        return self.failure is not None and not live_workers(self.redis, self.keys, dead_after)
