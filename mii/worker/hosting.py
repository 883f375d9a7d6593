"""Building a worker's engine and loop from the deployment's record in Redis: what every host
of the loop does first (the plain process of `mii.worker.main`, the Celery bootstep)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from mii.broker_config.connection import connect
from mii.broker_config.deployment import load_record
from mii.broker_config.keys import DeploymentKeys, process_name
from mii.config import MIIConfig
from mii.worker.engine_factory import load_factory, replica_devices
from mii.worker.loop import WorkerLoop
from mii.worker.observer import RequestObserver
from mii.worker.registry import FAILED, STARTING, WorkerRegistry

log = logging.getLogger("mii.worker")


@dataclass
class HostedWorker:
    loop: WorkerLoop
    engine: object
    mii_config: MIIConfig
    replica: int

    def close(self) -> None:
        getattr(self.engine, "close", lambda: None)()


@contextlib.contextmanager
def _still_starting(registry: WorkerRegistry, interval_s: float) -> Iterator[None]:
    """Keep reporting STARTING while the engine loads (minutes for a large model), so that
    nobody takes this worker for dead."""
    done = threading.Event()

    def beat() -> None:
        while not done.wait(interval_s):
            with contextlib.suppress(Exception):
                registry.report(STARTING)

    thread = threading.Thread(target=beat, name="mii-starting", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(interval_s + 1)


def build_worker(
    deployment: str,
    redis_url: str,
    replica: int,
    engine_factory: str,
    observer: RequestObserver | None = None,
) -> HostedWorker:
    """Connect, read the deployment's config, announce STARTING, build the engine (a failure
    is reported as the worker's FAILED status, then raised) and the loop around it."""
    redis = connect(redis_url)
    keys = DeploymentKeys(deployment)
    record = load_record(redis, keys)
    mii_config = MIIConfig.model_validate(record.mii_config)
    devices = replica_devices(mii_config, replica)
    registry = WorkerRegistry(redis, keys, process_name(), replica=replica, devices=devices)
    registry.report(STARTING)
    log.info("worker %s: replica %d on %s", process_name(), replica, devices)
    try:
        with _still_starting(registry, mii_config.broker.heartbeat_interval_s):
            engine = load_factory(engine_factory)(mii_config, replica)
    except Exception as exc:
        registry.report(FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    loop = WorkerLoop(
        engine, redis, deployment, mii_config.broker,
        registry=registry, observer=observer, record=record,
    )  # fmt: skip
    return HostedWorker(loop, engine, mii_config, replica)
