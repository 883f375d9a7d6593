"""Building a worker's engine and loop from the deployment's record in Redis: what the host
of the loop (the Celery bootstep, `mii.worker.celery.bootstep`) does first.

The engine comes from a factory, `module:function` (`--engine-factory`): by default
`build_engine`, the real `LLMEngine` on the replica's devices; the tests and the broker
benchmark name a fast fake with the same interface (`mii.engine.base.Engine`)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from mii.broker_config.connection import connect
from mii.broker_config.deployment import FAILED, STARTING, WorkerRegistry, load_record
from mii.broker_config.keys import DeploymentKeys, process_name
from mii.config import MIIConfig
from mii.engine.base import Engine
from mii.worker.loop import WorkerLoop
from mii.worker.observer import RequestObserver

log = logging.getLogger("mii.worker")
DEFAULT_FACTORY = "mii.worker.hosting:build_engine"


@dataclass
class HostedWorker:
    loop: WorkerLoop
    engine: Engine
    mii_config: MIIConfig
    replica: int

    def close(self) -> None:
        self.engine.close()


def build_engine(mii_config: MIIConfig, replica: int) -> Engine:
    """The real `LLMEngine` on this replica's devices."""
    import torch

    from mii.engine.engine import LLMEngine
    from mii.engine.loader import resolve_model_path

    model = mii_config.model_conf
    path = resolve_model_path(model.model_name_or_path)
    config = model.to_engine_config(path, replica=replica)
    if config.torch_device.type == "cpu":
        # Replicas on one host split its cores instead of fighting over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // model.replica_num))
    return LLMEngine(config)


def load_factory(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"engine factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def replica_devices(mii_config: MIIConfig, replica: int) -> list[int] | str:
    """What a replica runs on, for its status: CUDA device indices, or 'cpu'."""
    model = mii_config.model_conf
    if model.device == "cpu" or not _has_cuda():
        return "cpu"
    ids = model.device_ids(replica)
    return list(ids) if ids is not None else list(range(model.tensor_parallel))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


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
    engine_factory: str | None = None,
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
            engine = load_factory(engine_factory or DEFAULT_FACTORY)(mii_config, replica)
    except Exception as exc:
        registry.report(FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    loop = WorkerLoop(
        engine, redis, deployment, mii_config.broker,
        registry=registry, observer=observer, record=record,
    )  # fmt: skip
    return HostedWorker(loop, engine, mii_config, replica)
