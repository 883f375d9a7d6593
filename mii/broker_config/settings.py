"""Broker settings: where the Redis is and how the queue behaves (typed, validated).

`BrokerSettings` is part of a deployment's `MIIConfig` (field `broker`), so every worker
and client of a deployment reads the same limits from the config stored in Redis.
The URL itself is not stored there: each process names its own (`redis_url=` or
`MII_REDIS_URL`), since a password belongs to whoever connects.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, model_validator

REDIS_URL_ENV = "MII_REDIS_URL"
CELERY_BROKER_ENV = "MII_CELERY_BROKER_URL"
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
REQUEST_BYTES_PER_TOKEN = 32  # far above any tokenizer's bytes per token
MIN_REQUEST_BYTES = 1 << 20


class BrokerSettings(BaseModel):
    """Queue limits and timings of one deployment."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    max_queue_depth: int | None = Field(10_000, gt=0)
    """Most entries the interactive request stream may hold (queued + in flight); a submit
    beyond it fails with `QueueFullError`. None: no limit. With several partitions, each
    holds at most its share (rounded up)."""
    partitions: int = Field(1, ge=1, le=256)
    """Partitions of the interactive request stream, each under its own hash tag: on a
    Redis Cluster (`redis+cluster://`), a deployment spreads over as many primaries (a
    multiple of the primaries spreads evenly). 1: one slot, one Redis (the default)."""
    max_bulk_depth: int | None = Field(None, gt=0)
    """The same limit for the bulk stream."""
    reclaim_idle_s: float = Field(30.0, gt=0)
    """A pending entry idle this long belongs to a dead worker and is reclaimed."""
    heartbeat_interval_s: float = Field(5.0, gt=0)
    """How often a worker refreshes the idle time of the entries it holds."""
    max_deliveries: int = Field(3, gt=0)
    """A request delivered more often than this goes to the dead-letter stream."""
    response_ttl_s: int = Field(3600, gt=0)
    """Lifetime of a response stream after its last refresh (late readers replay it)."""
    admit_batch: int = Field(16, gt=0)
    """Most entries one XREADGROUP takes, so that idle workers share a burst."""
    block_ms: int = Field(100, gt=0)
    """How long an idle worker blocks on the request stream before looking around."""
    step_timeout_s: float | None = Field(600.0, gt=0)
    """An engine step that runs longer than this means the engine is stuck (a GPU kernel
    that never ends, a tensor-parallel rank that stopped answering): the worker process
    exits non-zero for its supervisor to restart it, and live workers take over its
    requests (mii/worker/watchdog.py). None: never. Keep it well above the longest step
    (a model's first steps compile kernels; a CPU engine's prefill chunks take seconds)."""
    drain_timeout_s: float = Field(60.0, ge=0)
    """On SIGTERM, how long in-flight requests may take before they are handed back."""
    reconnect_timeout_s: float = Field(120.0, gt=0)
    """How long a client keeps retrying a lost Redis connection before it gives up."""
    control_maxlen: int = Field(10_000, gt=0)
    """Approximate length the control stream (cancels, terminate) is trimmed to."""
    bulk_job_ttl_s: int = Field(3 * 24 * 3600, gt=0)
    """How long a bulk job's record and results stay after its last change (a submit, a
    finished line); `mii bulk submit --ttl` overrides it per job."""
    request_timeout_s: float | None = Field(600.0, gt=0)
    """Default deadline of an interactive request, when the call gives no `timeout=`;
    None: no deadline (the client still notices a request that vanished from Redis)."""
    client_timeout_s: float | None = Field(30.0, gt=0)
    """An interactive request whose client process stopped refreshing its liveness key for
    this long is cancelled, freeing its KV blocks (bulk lines are exempt). None: never."""
    lost_request_grace_s: float = Field(10.0, gt=0)
    """A client that heard nothing of a request for this long checks that Redis still holds
    it (queued, claimed or answered); a request that vanished fails with an error."""
    max_request_bytes: int | None = Field(None, gt=0)
    """Largest prompt a client submits, in UTF-8 bytes (or 4 bytes per token id); None:
    `REQUEST_BYTES_PER_TOKEN` per token of the deployment's max_length, at least 1 MiB."""
    publish_interval_ms: int = Field(20, ge=0)
    """While many requests run (`COALESCE_FROM` or more in a step), a worker writes each
    reply stream at most once per this interval, a request's tokens of several steps in one
    chunk; with fewer, every step is written as it ends. 0: every step always."""
    reply_maxlen: int = Field(10_000, gt=0)
    """Approximate length a reply stream is trimmed to (a client that falls further behind
    than this many engine steps loses tokens and is told so)."""
    deadletter_maxlen: int = Field(10_000, gt=0)
    """Approximate length the dead-letter stream is trimmed to."""
    worker_restarts_per_minute: int = Field(5, ge=0)
    """How often `mii.serve` restarts a crashed worker of its own in a minute before it
    declares the deployment failed."""

    @property
    def dead_after_s(self) -> float:
        """A worker whose status is older than this is dead: its requests are reclaimed
        without waiting for `reclaim_idle_s`."""
        return 3 * self.heartbeat_interval_s

    def prompt_byte_limit(self, max_length: int | None) -> int:
        """The byte limit of one prompt (`max_request_bytes`, else derived from max_length)."""
        if self.max_request_bytes is not None:
            return self.max_request_bytes
        return max(MIN_REQUEST_BYTES, REQUEST_BYTES_PER_TOKEN * (max_length or 0))

    @model_validator(mode="after")
    def _heartbeat_faster_than_reclaim(self) -> BrokerSettings:
        if self.heartbeat_interval_s * 2 > self.reclaim_idle_s:
            raise ValueError(
                f"heartbeat_interval_s ({self.heartbeat_interval_s}) must be at most half of "
                f"reclaim_idle_s ({self.reclaim_idle_s}), or live workers lose their requests"
            )
        return self


def explicit_redis_url(redis_url: str | None = None) -> str | None:
    """The URL a user named: the argument, else `MII_REDIS_URL`, else None."""
    url = redis_url or os.environ.get(REDIS_URL_ENV) or None
    if url is not None:
        check_redis_url(url)
    return url


def celery_broker_url(redis_url: str) -> str:
    """Celery's own broker for workers of the deployment at `redis_url`: `MII_CELERY_BROKER_URL`
    if set, else the deployment's Redis itself. Celery (kombu) cannot use a Redis Cluster
    as its broker (it would fail on the first MOVED reply), so a cluster deployment's
    workers need a plain Redis for it; without one they fall back to kombu's in-process
    `memory://` broker: they serve, but Flower, task events and remote control do not
    reach them."""
    url = os.environ.get(CELERY_BROKER_ENV) or None
    if url is not None:
        if is_cluster_url(url):
            raise ValueError(f"{CELERY_BROKER_ENV} must name a plain Redis, not a cluster")
        return url
    return "memory://" if is_cluster_url(redis_url) else redis_url


def check_redis_url(url: str) -> None:
    """Refuse URLs redis-py would misread (a clear error instead of a connection hang)."""
    scheme = urlsplit(url).scheme
    if scheme not in ("redis", "rediss", "unix", *CLUSTER_SCHEMES):
        raise ValueError(
            "Redis URL must start with redis://, rediss://, unix:// or (a Redis Cluster) "
            f"redis+cluster:// or rediss+cluster://, got {redact_url(url)!r}"
        )


def is_cluster_url(url: str) -> bool:
    """Whether `url` names a Redis Cluster: `redis+cluster://[user:password@]host:port[,
    host:port...]` (`rediss+cluster://` for TLS)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES


def redact_url(url: str) -> str:
    """The URL with its password replaced, for logs and error messages."""
    parts = urlsplit(url)
    if "@" not in parts.netloc or ":" not in parts.netloc.rpartition("@")[0]:
        return url
    user = parts.netloc.rpartition("@")[0].partition(":")[0]
    netloc = f"{user}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
