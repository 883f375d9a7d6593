"""`mii.serve`: make sure a Redis is there, record the deployment, start its workers, wait
until they are ready, and hand back a `Client` that can also stop them."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mii.broker_config.connection import answers, connect
from mii.broker_config.deployment import (
    DeploymentRecord,
    read_workers,
    remember_url,
    save_record,
)
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url, redact_url
from mii.config import MIIConfig
from mii.errors import MIIError
from mii.producer.client import Client
from mii.worker.embedded_redis import EmbeddedRedis
from mii.worker.engine_factory import DEFAULT_FACTORY
from mii.worker.processes import WorkerProcess, spawn_worker, stop_processes
from mii.worker.registry import FAILED, READY

if TYPE_CHECKING:
    from mii.gateway.server import GatewayProcess

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0


@dataclass
class LocalDeployment:
    """What this process started: worker processes and maybe a Redis server."""

    workers: list[WorkerProcess] = field(default_factory=list)
    redis: EmbeddedRedis | None = None
    gateway: GatewayProcess | None = None
    """The HTTP gateway, with `enable_restful_api`."""

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        stop_processes(self.workers, timeout_s)

    def stop_redis(self) -> None:
        if self.redis is not None:
            self.redis.stop()


def find_redis(mii_config: MIIConfig) -> tuple[str, EmbeddedRedis | None]:
    """The URL named (argument or MII_REDIS_URL); else a Redis answering on the default
    address; else a freshly started embedded one."""
    url = explicit_redis_url(mii_config.redis_url)
    if url is not None:
        if not answers(url, timeout_s=5.0):
            raise MIIError(f"no Redis answers at {redact_url(url)}")
        return url, None
    if answers(DEFAULT_REDIS_URL, timeout_s=0.5):
        return DEFAULT_REDIS_URL, None
    embedded = EmbeddedRedis().start()
    log.info("started an embedded Redis at %s", embedded.url)
    return embedded.url, embedded


def serve_deployment(
    mii_config: MIIConfig,
    engine_factory: str = DEFAULT_FACTORY,
    ready_timeout_s: float = READY_TIMEOUT_S,
) -> Client:
    """Start `replica_num` workers of `mii_config` and return a client once all are ready."""
    url, embedded = find_redis(mii_config)
    owner = LocalDeployment(redis=embedded)
    try:
        redis = connect(url)
        keys = DeploymentKeys(mii_config.deployment_name)
        _refuse_running(redis, keys, mii_config)
        record = DeploymentRecord(
            # not the URL: it may hold a password, and each process names its own
            mii_config=mii_config.model_dump(mode="json", by_alias=True, exclude={"redis_url"}),
            embedded_redis=embedded is not None,
        )
        save_record(redis, keys, record)
        if embedded is not None:
            remember_url(keys.deployment, url)
        for replica in range(mii_config.model_conf.replica_num):
            owner.workers.append(spawn_worker(keys.deployment, url, replica, None, engine_factory))
        wait_ready(redis, keys, owner.workers, ready_timeout_s)
        if mii_config.enable_restful_api:
            owner.gateway = _start_gateway(mii_config, url)
    except BaseException:
        owner.stop_gateway()
        owner.stop_workers(timeout_s=5.0)
        owner.stop_redis()
        raise
    return Client(mii_config, url, redis_client=redis, owner=owner)


def _start_gateway(mii_config: MIIConfig, url: str) -> GatewayProcess:
    """MII's RESTful API, here the whole gateway (`mii.gateway`), on `restful_api_port`."""
    from mii.gateway.server import spawn_gateway

    host, port = mii_config.restful_api_host, mii_config.restful_api_port
    return spawn_gateway(mii_config.deployment_name, url, host, port)


def _refuse_running(redis, keys: DeploymentKeys, mii_config: MIIConfig) -> None:
    stale_before = time.time() - mii_config.broker.reclaim_idle_s
    live = [
        name
        for name, w in read_workers(redis, keys).items()
        if w["state"] != FAILED and w["heartbeat"] > stale_before
    ]
    if live:
        raise MIIError(
            f"deployment {keys.deployment!r} is already served by {', '.join(live)}: "
            "terminate it first or choose another deployment_name"
        )
    redis.delete(keys.workers)


def wait_ready(redis, keys: DeploymentKeys, workers: list[WorkerProcess], timeout_s: float):
    """Until every worker reports ready; a clear error with its log tail if one dies."""
    deadline = time.monotonic() + timeout_s
    pids = {w.pid for w in workers}
    while True:
        status = {s["pid"]: s for s in read_workers(redis, keys).values() if s["pid"] in pids}
        for worker in workers:
            _check_alive(worker, status.get(worker.pid))
        if sum(s["state"] == READY for s in status.values()) == len(workers):
            return
        if time.monotonic() > deadline:
            raise MIIError(
                f"workers of {keys.deployment!r} not ready after {timeout_s:.0f}s; "
                f"log of replica 0 ({workers[0].log_path}):\n{workers[0].log_tail()}"
            )
        time.sleep(0.1)


def _check_alive(worker: WorkerProcess, status: dict | None) -> None:
    code = worker.exit_code()
    failed = status is not None and status["state"] == FAILED
    if code is None and not failed:
        return
    reason = status.get("error") if failed else f"exited with code {code}"
    raise MIIError(
        f"worker replica {worker.replica} (pid {worker.pid}) failed to start: {reason}\n"
        f"last lines of {worker.log_path}:\n{worker.log_tail()}"
    )
