"""Ending a deployment from any client: tell its workers, wait for them, forget it."""

from __future__ import annotations

import logging
import time

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS
from mii.broker_config.deployment import forget_url, load_record, read_workers
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings
from mii.broker_config.wire import ControlMessage
from mii.errors import DeploymentNotFoundError

log = logging.getLogger(__name__)


def terminate_deployment(
    redis, keys: DeploymentKeys, settings: BrokerSettings, owner, timeout_s: float
) -> None:
    """The launcher's HTTP gateway stops first. Workers stop on a `terminate` control
    message (they hand unfinished requests back to the stream); the launcher's own
    processes are waited for and killed if they hang; an embedded Redis is shut down last."""
    try:
        record = load_record(redis, keys)
    except DeploymentNotFoundError:
        record = None
    if owner is not None:
        owner.stop_gateway()  # no new requests while the workers stop
    redis.xadd(keys.control, wire.control_fields(ControlMessage(op="terminate")))
    deadline = time.monotonic() + timeout_s
    _wait_for_workers(redis, keys, settings, deadline)
    if owner is not None:
        owner.stop_workers(max(1.0, deadline - time.monotonic()))
    redis.delete(keys.config, keys.workers, keys.control)
    forget_url(keys.deployment)
    if record is not None and record.embedded_redis:
        _shutdown_redis(redis)
        if owner is not None:
            owner.stop_redis()


def _wait_for_workers(redis, keys: DeploymentKeys, settings: BrokerSettings, deadline) -> None:
    while time.monotonic() < deadline:
        stale_before = time.time() - settings.reclaim_idle_s
        live = [w for w in read_workers(redis, keys).values() if w["heartbeat"] > stale_before]
        if not live:
            return
        time.sleep(0.1)
    log.warning("workers of %s did not stop in time", keys.deployment)


def _shutdown_redis(redis) -> None:
    try:
        redis.shutdown(nosave=True)
    except CONNECTION_ERRORS:
        pass  # it went away while answering, as it should
    except Exception as exc:  # noqa: BLE001 (ACLs may forbid SHUTDOWN; the owner kills it)
        log.warning("could not shut the embedded Redis down: %s", exc)
