"""A deployment in Redis: its record (`mii:{dep}:config`, what every client and worker
reads), its state (`:state`), and its workers' statuses (`:workers`: each worker writes its
own, `WorkerRegistry`; anyone reads them, liveness coming from the heartbeat). For embedded
Redis servers, also a note on this host, so that `mii.client(name)` finds the deployment
from any process."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from mii.broker_config.connection import as_text
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.wire import WIRE_VERSION
from mii.errors import DeploymentNotFoundError

STARTING, READY, DRAINING, FAILED = "starting", "ready", "draining", "failed"
EXITED = "exited"
"""Set by a supervisor (`mii.serve`) that saw the worker's process end: its requests are
reclaimed at once."""
SERVING, TERMINATING = "serving", "terminating"
"""Deployment states in `keys.state`, beside STARTING and FAILED (its workers kept crashing)."""


class DeploymentRecord(BaseModel):
    """What `mii.serve` writes and every client and worker of the deployment reads."""

    model_config = ConfigDict(extra="ignore")

    mii_config: dict
    """`MIIConfig.model_dump(mode="json", by_alias=True)`: model, replicas, broker limits."""
    wire_version: int = WIRE_VERSION
    embedded_redis: bool = False
    """Whether the Redis was started by `mii.serve` (terminate_server then stops it)."""
    created: float = Field(default_factory=time.time)


def save_record(client, keys: DeploymentKeys, record: DeploymentRecord) -> None:
    client.set(keys.config, record.model_dump_json())


def load_record(client, keys: DeploymentKeys) -> DeploymentRecord:
    raw = client.get(keys.config)
    if raw is None:
        raise DeploymentNotFoundError(f"no deployment named {keys.deployment!r} in this Redis")
    return DeploymentRecord.model_validate_json(raw)


def set_state(client, keys: DeploymentKeys, state: str, error: str | None = None) -> None:
    """Record the deployment's state (`keys.state`: state, since, and error when failed)."""
    fields = {"state": state, "since": time.time(), **({"error": error} if error else {})}
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.state)
    pipe.hset(keys.state, mapping=fields)
    pipe.execute()


def read_state(client, keys: DeploymentKeys) -> dict[str, str]:
    """The deployment's state as its launcher last recorded it; {} when none is recorded."""
    return {as_text(k): as_text(v) for k, v in client.hgetall(keys.state).items()}


def _local_dir() -> Path:
    root = os.environ.get("MII_CACHE_DIR") or Path.home() / ".cache" / "mii"
    return Path(root) / "deployments"


def remember_url(deployment: str, url: str) -> None:
    """Note on this host where an embedded Redis of a deployment listens. The URL holds the
    Redis's password: the note is readable by its owner only (0600 in a 0700 folder)."""
    folder = _local_dir()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)  # made by an earlier version with the default mode
    path = folder / f"{deployment.replace('/', '_')}.json"
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(json.dumps({"redis_url": url}))
    tmp.replace(path)


def remembered_url(deployment: str) -> str | None:
    path = _local_dir() / f"{deployment.replace('/', '_')}.json"
    try:
        return json.loads(path.read_text())["redis_url"]
    except (OSError, ValueError, KeyError):
        return None


def forget_url(deployment: str) -> None:
    path = _local_dir() / f"{deployment.replace('/', '_')}.json"
    path.unlink(missing_ok=True)


class WorkerRegistry:
    """One worker's entry in the `workers` hash (the writer; `read_workers` and
    `live_workers` are the readers): what the launcher's ready check, terminate,
    takeovers and operators read."""

    def __init__(self, client, keys: DeploymentKeys, consumer: str, **identity) -> None:
        self.redis, self.keys, self.consumer = client, keys, consumer
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), **identity}
        self.started = time.time()

    def report(self, state: str, **info) -> None:
        status = {**self.identity, "state": state, "started": self.started, **info}
        status["heartbeat"] = time.time()
        self.redis.hset(self.keys.workers, self.consumer, json.dumps(status))

    def remove(self) -> None:
        self.redis.hdel(self.keys.workers, self.consumer)


def read_workers(client, keys: DeploymentKeys) -> dict[str, dict]:
    """Consumer name -> last reported status of every worker that registered."""
    raw = client.hgetall(keys.workers)
    return {as_text(k): json.loads(v) for k, v in raw.items()}


def is_live(status: dict, dead_after_s: float, now: float | None = None) -> bool:
    """Whether a worker's status says it is alive: not failed or exited, and its heartbeat
    is recent (a worker killed with SIGKILL leaves a status that only ages)."""
    now = time.time() if now is None else now
    fresh = status.get("heartbeat", 0) > now - dead_after_s
    return fresh and status.get("state") not in (FAILED, EXITED)


def live_workers(client, keys: DeploymentKeys, dead_after_s: float) -> dict[str, dict]:
    """The statuses of the deployment's workers that are alive (`is_live`)."""
    now = time.time()
    workers = read_workers(client, keys).items()
    return {name: s for name, s in workers if is_live(s, dead_after_s, now)}


def mark_exited(client, keys: DeploymentKeys, host: str, pid: int, exit_code: int | None) -> bool:
    """Set the status of the worker process `pid` on `host` to EXITED (its supervisor saw
    it end), so that live workers reclaim its requests at once. False: it left no status."""
    for name, status in read_workers(client, keys).items():
        if status.get("pid") == pid and status.get("host") == host:
            status.update(state=EXITED, exit_code=exit_code)
            client.hset(keys.workers, name, json.dumps(status))
            return True
    return False
