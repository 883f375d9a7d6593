"""Worker processes that `mii.serve` starts on this host, and their logs."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from mii.broker_config.settings import REDIS_URL_ENV
from mii.launch.child import ChildProcess
from mii.launcher_env import without_launcher


@dataclass
class WorkerProcess(ChildProcess):
    replica: int = 0
    started: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class WorkerSpec:
    """How `mii.serve` starts the workers of one deployment (and restarts them)."""

    deployment: str
    redis_url: str = field(repr=False)  # may hold a password
    engine_factory: str | None = None
    """`module:function` building each worker's engine; None: the real engine."""
    log_dir: str = ""
    """Where the workers' logs go; empty: a new temporary folder."""

    def __post_init__(self) -> None:
        if not self.log_dir:
            prefix = f"mii-{self.deployment.replace('/', '_')}-"
            object.__setattr__(self, "log_dir", tempfile.mkdtemp(prefix=prefix))

    def spawn(self, replica: int) -> WorkerProcess:
        """Start `mii worker` (a Celery worker hosting the engine) for one replica. The URL
        travels in the
        environment, not the command line, so its password stays out of `ps`. The worker
        gets its own session: like MII's server it outlives the process that served it.
        A restarted replica appends to the same log."""
        log_path = os.path.join(self.log_dir, f"worker-{replica}.log")
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                self._command(replica),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self._environment(),
                start_new_session=True,
            )
        return WorkerProcess(process, log_path, replica)

    def _command(self, replica: int) -> list[str]:
        cmd = [sys.executable, "-m", "mii", "worker", "--deployment", self.deployment]
        cmd += ["--replica", str(replica)]
        return cmd + (["--engine-factory", self.engine_factory] if self.engine_factory else [])

    def _environment(self) -> dict[str, str]:
        # not a launcher's rank (mii.serve under torchrun): the worker's ranks are its own
        env = {**without_launcher(os.environ), REDIS_URL_ENV: self.redis_url,
               "PYTHONUNBUFFERED": "1"}  # fmt: skip
        # A worker shares its cores with its publisher thread and often with Redis: OpenMP
        # threads that spin while they wait take those cycles (SmolLM2 served on two cores:
        # 423 -> 472 tok/s in scripts/bench_queue.py). Set OMP_WAIT_POLICY to choose otherwise.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        return env
