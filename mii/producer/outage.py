"""When the deployment's Redis is gone: what a client says, and the cancels it still owes.

A call that cannot reach Redis for `reconnect_timeout_s` raises `BrokerUnavailableError`.
Its requests may still be queued or generating (the Redis may be fine, only this host cut
off), so the client remembers their ids and cancels them at its next successful Redis call
or when it is closed: an abandoned request does not run to its length limit.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

import redis

from mii.broker_config import wire
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings, redact_url
from mii.broker_config.wire import ControlMessage
from mii.errors import BrokerUnavailableError


def broker_unavailable(
    exc: BaseException, urls: Sequence[str | None], waited_s: float | None = None
) -> BrokerUnavailableError:
    """The error for a Redis that refused the credentials or did not answer (URLs
    without their passwords)."""
    where = " or ".join(redact_url(u) if u else "the deployment's Redis" for u in urls)
    if isinstance(exc, redis.AuthenticationError):
        if not any(u and urlsplit(u).password for u in urls):
            return BrokerUnavailableError(
                f"the Redis at {where} wants a password and the URL gives none: "
                "use redis://[user]:password@host:port"
            )
        return BrokerUnavailableError(
            f"the Redis at {where} refused the credentials ({exc}): check the user and "
            "password in the Redis URL"
        )
    waited = f" for {waited_s:g}s (broker.reconnect_timeout_s)" if waited_s else ""
    return BrokerUnavailableError(f"no Redis answers at {where}{waited}: {exc}")


def queue_cancels(pipe, keys: DeploymentKeys, settings: BrokerSettings, rids: Iterable[str]):
    """Add the cancels of `rids` to `pipe` and return it: a marker for workers that read
    the request later, and a control message for the one serving it now."""
    for rid in rids:
        pipe.set(keys.cancelled(rid), 1, ex=settings.response_ttl_s)
        fields = wire.control_fields(ControlMessage(op="cancel", rid=rid))
        pipe.xadd(keys.control, fields, maxlen=settings.control_maxlen, approximate=True)
    return pipe


class Abandoned:
    """Ids of requests a client gave up on during an outage, to cancel later (thread-safe:
    threads share a client)."""

    def __init__(self) -> None:
        self._rids: dict[str, None] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._rids)

    def add(self, rids: Iterable[str]) -> None:
        with self._lock:
            self._rids.update(dict.fromkeys(rids))

    def take(self) -> list[str]:
        """All of them, forgotten here: `add` them back if their cancel fails."""
        with self._lock:
            rids, self._rids = list(self._rids), {}
        return rids
