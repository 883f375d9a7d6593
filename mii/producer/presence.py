"""Noticing a request that vanished from Redis, and a deployment that failed.

A Redis that comes back empty (a restart without persistence, FLUSHALL, a failover to a
replica that lacks the data) takes the queued and running requests with it, and no worker
will ever answer them. So a client that heard nothing of a request for
`lost_request_grace_s` asks Redis, in one round trip, whether it still holds the request
in any form: its entry in the request stream or a worker's claim on it. If neither is
there, the request is lost. No transaction is needed (the keys may lie in several slots of
a Redis Cluster): the entry is read before the claim, and a worker claims a request before
its entry leaves the stream and keeps the claim after, so a request on its way from one to
the other is seen in one of them. The same round trip reads the deployment's state: a
deployment whose launcher gave up on its workers fails its requests at once.

No I/O here: `queue` adds the commands to a pipeline of either client (blocking or
asyncio), which executes it and hands the replies to `judge`.
"""

from __future__ import annotations

import time

from mii.broker_config.connection import as_text
from mii.broker_config.deployment import FAILED
from mii.broker_config.keys import DeploymentKeys
from mii.errors import RequestLostError
from mii.producer.request_set import PendingRequest, RequestSet
from mii.producer.submit import deployment_failed


class PresenceCheck:
    def __init__(self, keys: DeploymentKeys, grace_s: float) -> None:
        self.keys, self.grace_s = keys, grace_s

    def suspects(self, requests: RequestSet) -> list[PendingRequest]:
        """The requests to ask about now (none, most of the time)."""
        return requests.silent(self.grace_s)

    def queue(self, pipe, suspects: list[PendingRequest]):
        """Add the check's commands to `pipe` (a pipeline) and return it."""
        for request in suspects:
            if request.entry_id is not None:
                pipe.xrange(request.stream, request.entry_id, request.entry_id)
            pipe.exists(self.keys.claim(request.rid))
        pipe.hmget(self.keys.state, "state", "error")
        return pipe

    def judge(self, suspects: list[PendingRequest], replies: list) -> None:
        """Raise `DeploymentFailedError` or `RequestLostError` from the check's replies;
        requests still held count as heard of now."""
        state, error = (as_text(v, "replace") for v in replies[-1])
        if state == FAILED:
            raise deployment_failed(self.keys.deployment, error)
        replies, now = iter(replies[:-1]), time.monotonic()
        for request in suspects:
            held = request.entry_id is not None and bool(next(replies))
            held = next(replies) > 0 or held
            if not held:
                raise _lost(request)
            request.heard_at = now


def _lost(request: PendingRequest) -> RequestLostError:
    return RequestLostError(
        f"request {request.rid} vanished from Redis: it is not queued, no worker holds it, "
        "and it has no response. Was Redis flushed, or restarted without persistence (or "
        "failed over to a replica without it)? Submit it again."
    )
