"""Ending a deployment from any client, leaving a clean slate behind.

Every request still waiting ends with an error its client reads; the deployment's streams
and keys are deleted, so a later deployment of the same name serves none of them. Response
streams are left to expire (late readers still find the error), bulk jobs keep their TTL
(their lines record the error as their result).
"""

from __future__ import annotations

import logging
import time

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, as_text
from mii.broker_config.deployment import (
    FAILED,
    TERMINATING,
    forget_url,
    live_workers,
    load_record,
    read_state,
    set_state,
)
from mii.broker_config.jobs import RECORD_SCRIPT, result_payload
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings
from mii.broker_config.wire import ControlMessage, ErrorKind, RequestMessage, WireError
from mii.constants import GenerationFinishReason as Reason
from mii.errors import DeploymentNotFoundError

log = logging.getLogger(__name__)
TERMINATED = "deployment terminated"
ENDED_RESPONSE_TTL_S = 300
"""Lifetime of a response stream that got its error here: long enough for a client that is
reconnecting, short enough that a terminated deployment leaves nothing for long."""
PAGE = 500
EMBEDDED_GRACE_S = 0.5  # waiting clients read their error before the embedded Redis stops


def terminate_deployment(
    redis, keys: DeploymentKeys, settings: BrokerSettings, owner, timeout_s: float
) -> None:
    """Stop the launcher's HTTP gateway (no new requests), mark the deployment TERMINATING
    (supervisors stop restarting workers), tell the workers (they end their requests with an
    error and stop), wait for the live ones, end every request still queued, delete the
    deployment's keys, wait for the launcher's own processes (`owner`), and shut down a
    Redis that `mii.serve` embedded."""
    if owner is not None:
        owner.stop_gateway()
    record = _record_or_none(redis, keys)
    error = _why_ended(redis, keys)
    set_state(redis, keys, TERMINATING)
    fields = wire.control_fields(ControlMessage(op="terminate"))
    redis.xadd(keys.control, fields, maxlen=settings.control_maxlen, approximate=True)
    deadline = time.monotonic() + timeout_s
    _wait_for_workers(redis, keys, settings, deadline)
    ended = end_queued_requests(
        redis, keys, error, min(ENDED_RESPONSE_TTL_S, settings.response_ttl_s)
    )
    delete_deployment_keys(redis, keys, settings.response_ttl_s)
    forget_url(keys.deployment)
    if owner is not None:
        owner.stop_workers(max(1.0, deadline - time.monotonic()))
    log.info("terminated %s: %d queued request(s) ended", keys.deployment, ended)
    if record is not None and record.embedded_redis:
        time.sleep(EMBEDDED_GRACE_S)
        _shutdown_redis(redis)
        if owner is not None:
            owner.stop_redis()


def _record_or_none(redis, keys: DeploymentKeys):
    try:
        return load_record(redis, keys)
    except DeploymentNotFoundError:
        return None


def _why_ended(redis, keys: DeploymentKeys) -> str:
    state = read_state(redis, keys)
    if state.get("state") != FAILED:
        return TERMINATED
    why = state.get("error", "").partition("\n")[0]  # not the log tail, in every response
    return f"{TERMINATED} after it failed: {why}"


def _wait_for_workers(redis, keys: DeploymentKeys, settings: BrokerSettings, deadline) -> None:
    """Until no worker is live (by its heartbeat: a killed one is not waited for long)."""
    while time.monotonic() < deadline:
        if not live_workers(redis, keys, settings.dead_after_s):
            return
        time.sleep(0.1)
    log.warning("workers of %s did not stop in time", keys.deployment)


# ---- requests nobody will serve -------------------------------------------------------
def end_queued_requests(redis, keys: DeploymentKeys, error: str, ttl_s: int) -> int:
    """Give every request still in the request streams (unread, or pending with a worker
    that is gone) a final error chunk on its response or reply stream (expiring after
    `ttl_s`), and
    every bulk line among them an error result in its job. Returns how many entries."""
    ended = 0
    for stream in keys.request_streams():
        start = "-"
        while entries := redis.xrange(stream, min=start, count=PAGE):
            pipe = redis.pipeline(transaction=False)
            for _, fields in entries:
                _end_request(pipe, keys, fields, error, ttl_s)
            pipe.execute()
            ended += len(entries)
            start = "(" + as_text(entries[-1][0], "replace")
    return ended


def _end_request(pipe, keys: DeploymentKeys, fields: dict, error: str, ttl_s: int) -> None:
    rid, message = _request_of(fields)
    if message is not None and message.job is not None:
        job = keys.job(message.job)
        payload = result_payload(Reason.ERROR, error=error, etype=ErrorKind.GENERATION)
        pipe.eval(RECORD_SCRIPT, 4, *job.all(), time.time(), message.line, payload, 0, 1)
    elif rid is not None:
        chunk = wire.chunk_fields(reason=Reason.ERROR, error=error, etype=ErrorKind.GENERATION)
        reply = None if message is None else message.reply
        key = keys.response(rid) if reply is None else keys.replies(reply)
        entry = wire.pack(chunk) if reply is None else wire.reply_payload({rid: chunk})
        pipe.xadd(key, {wire.PAYLOAD: entry})
        pipe.expire(key, ttl_s)


def _request_of(fields: dict) -> tuple[str | None, RequestMessage | None]:
    """(request id, message) of an entry; the plain `rid` field alone when the message does
    not decode, None for an id that is not one (a forged entry names no valid stream)."""
    try:
        message = wire.decode_request(fields)
        return message.rid, message
    except WireError:
        pass
    try:
        return RequestMessage(rid=as_text(fields.get(wire.RID, b""), "replace")).rid, None
    except ValueError:
        return None, None


# ---- keys ------------------------------------------------------------------------------
def delete_deployment_keys(redis, keys: DeploymentKeys, response_ttl_s: int) -> None:
    """Delete every key of the deployment (config, workers, state, control and request
    streams, dead letters, claims, cancel markers, client keys) except response and reply
    streams, which only get an expiry if they lack one, and bulk jobs, which keep their
    TTL."""
    for prefix in keys.prefixes:
        for batch in _scan_batches(redis, f"{prefix}:*"):
            kinds = {key: key[len(prefix) + 1 :].split(":", 1)[0] for key in batch}
            answers = ("resp", "replies")  # clients still read them: they expire instead
            doomed = [key for key, kind in kinds.items() if kind not in (*answers, "job")]
            if doomed:
                redis.unlink(*doomed)
            _expire_forever_streams(redis, [k for k, kind in kinds.items() if kind in answers],
                                    response_ttl_s)  # fmt: skip


def _scan_batches(redis, pattern: str, size: int = 1000):
    """Keys matching `pattern` a batch at a time (on every primary of a cluster)."""
    batch: list[str] = []
    for key in redis.scan_iter(match=pattern, count=size):
        batch.append(as_text(key, "replace"))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _expire_forever_streams(redis, streams: list[str], ttl_s: int) -> None:
    if not streams:
        return
    pipe = redis.pipeline(transaction=False)
    for key in streams:
        pipe.ttl(key)
    lasting = [key for key, ttl in zip(streams, pipe.execute(), strict=True) if ttl == -1]
    for key in lasting:
        pipe.expire(key, ttl_s)
    pipe.execute()


def _shutdown_redis(redis) -> None:
    try:
        redis.shutdown(nosave=True)
    except CONNECTION_ERRORS:
        pass  # it went away while answering, as it should
    except Exception as exc:  # noqa: BLE001 (ACLs may forbid SHUTDOWN; the owner kills it)
        log.warning("could not shut the embedded Redis down: %s", exc)
