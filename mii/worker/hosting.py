"""Building a worker's engine and loop from the deployment's record in Redis: what every host
of the loop does first (the plain process of `mii.worker.main`, the Celery bootstep)."""

from __future__ import annotations

import logging
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
        engine = load_factory(engine_factory)(mii_config, replica)
    except Exception as exc:
        registry.report(FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    loop = WorkerLoop(
        engine, redis, deployment, mii_config.broker,
        registry=registry, observer=observer, record=record,
    )  # fmt: skip
    return HostedWorker(loop, engine, mii_config, replica)
