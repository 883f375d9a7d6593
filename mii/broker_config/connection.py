"""Connecting to Redis: one place for timeouts, TLS and retry with backoff, and the one
place that picks the client for a URL: `redis://` (`rediss://`, `unix://`) one Redis,
`redis+cluster://[user:password@]host:port[,host:port...]` (`rediss+cluster://`) a Redis
Cluster through redis-py's cluster client, which follows MOVED and ASK redirections.

redis-py retries a failed command a few times on its own (short outages); the loops of the
worker and the client add `Backoff` on top, so a Redis restart of any length is waited out,
and so is a cluster's failover (a primary's replica promoted: `CLUSTERDOWN`, `TRYAGAIN`,
connections refused, replies from a demoted primary).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
from redis import exceptions
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from mii.broker_config.settings import check_redis_url, is_cluster_url, redact_url

T = TypeVar("T")
CLUSTER_ERRORS = (
    exceptions.ClusterDownError,  # CLUSTERDOWN, MASTERDOWN: a failover under way
    exceptions.TryAgainError,
    exceptions.ClusterError,  # redirections or retries exhausted while slots move
    exceptions.SlotNotCoveredError,
    exceptions.ReadOnlyError,  # a write reached a primary that was just demoted
    # no node answered while the client refreshed its map of the cluster (it says so with
    # this base class; our code sends no command across slots, the other reason for it)
    exceptions.RedisClusterException,
)
CONNECTION_ERRORS = (redis.ConnectionError, redis.TimeoutError, ConnectionError, *CLUSTER_ERRORS)
SOCKET_TIMEOUT_S = 15.0  # above every blocking read we issue (they block at most 2 s)


def _options() -> dict:
    return dict(
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


def connect(url: str, **overrides) -> redis.Redis | Cluster:
    """A client for `url` (redis://user:password@host:port/db, rediss:// for TLS; a
    cluster's `redis+cluster://`)."""
    check_redis_url(url)
    options = {**_options(), **overrides}
    if is_cluster_url(url):
        nodes = [redis.cluster.ClusterNode(h, p) for h, p in _cluster_nodes(url)]
        return Cluster(startup_nodes=nodes, **_cluster_options(url), **_for_cluster(options))
    return redis.Redis.from_url(url, **options)


def connect_async(url: str, **overrides):
    """The asyncio client for `url`; bound to the event loop that first uses it."""
    check_redis_url(url)
    options = {**_options(), **overrides}
    if is_cluster_url(url):
        nodes = [redis.asyncio.cluster.ClusterNode(h, p) for h, p in _cluster_nodes(url)]
        options = _for_cluster(options)
        options.pop("health_check_interval", None)
        return AsyncCluster(startup_nodes=nodes, **_cluster_options(url), **options)
    return redis.asyncio.Redis.from_url(url, **options)


def _stream_keys(args) -> list | None:
    """The keys of an XREAD or XREADGROUP (the names after STREAMS), else None. redis-py
    asks a node for them (COMMAND GETKEYS: one more round trip per read, and a read that
    fails while that node is down, even when the streams live elsewhere)."""
    if str(args[0]).upper() not in ("XREAD", "XREADGROUP"):
        return None
    words = [a.decode() if isinstance(a, bytes) else str(a) for a in args]
    at = [w.upper() for w in words].index("STREAMS")
    rest = args[at + 1 :]
    return list(rest[: len(rest) // 2])


class Cluster(redis.cluster.RedisCluster):
    """redis-py's cluster client, refreshing its map of the cluster when a pipeline cannot
    reach a node. redis-py refreshes it after a single command's connection error, but a
    transaction's pipeline only on every fifth error of the same pipeline object: a fresh
    pipeline per try (how we retry) would keep writing to a primary that failed over.
    The keys of stream reads are found here (`_stream_keys`)."""

    def _get_command_keys(self, *args):
        keys = _stream_keys(args)
        return keys if keys is not None else super()._get_command_keys(*args)

    def pipeline(self, transaction=None, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        execute, command_keys = pipe.execute, pipe._get_command_keys
        pipe._get_command_keys = lambda *args: (  # a pipeline finds its keys on its own
            _stream_keys(args) if _stream_keys(args) is not None else command_keys(*args)
        )

        def execute_or_refresh(raise_on_error: bool = True):
            try:
                return execute(raise_on_error)
            except CONNECTION_ERRORS:
                with contextlib.suppress(*CONNECTION_ERRORS):
                    self.nodes_manager.initialize()
                raise

        pipe.execute = execute_or_refresh
        return pipe


class AsyncCluster(redis.asyncio.cluster.RedisCluster):
    """`Cluster` for asyncio."""

    async def _determine_slot(self, command: str, *args) -> int:
        keys = _stream_keys((command, *args))
        if keys is None:
            return await super()._determine_slot(command, *args)
        slots = {self.keyslot(key) for key in keys}
        if len(slots) != 1:
            raise redis.RedisClusterException(f"{command} reads streams in several slots")
        return slots.pop()

    def pipeline(self, transaction=None, shard_hint=None):
        if shard_hint:
            raise redis.RedisClusterException("shard_hint is not supported in cluster mode")
        return _AsyncClusterPipeline(self, transaction)


class _AsyncClusterPipeline(redis.asyncio.cluster.ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, **kwargs):
        try:
            return await super().execute(raise_on_error, **kwargs)
        except CONNECTION_ERRORS:
            with contextlib.suppress(*CONNECTION_ERRORS):
                await self.cluster_client.nodes_manager.initialize()
            raise


def _cluster_nodes(url: str) -> list[tuple[str, int]]:
    """host:port pairs of a cluster URL (the nodes asked for the cluster's layout)."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    nodes = []
    for part in filter(None, netloc.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"a Redis Cluster URL lists host:port pairs: {redact_url(url)!r}")
        nodes.append((host.strip("[]"), int(port)))
    if not nodes:
        raise ValueError(f"a Redis Cluster URL names at least one node: {redact_url(url)!r}")
    return nodes


def _cluster_options(url: str) -> dict:
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"a Redis Cluster has database 0 only: {redact_url(url)!r}")
    userinfo = parts.netloc.rpartition("@")[0]
    user, has_password, password = userinfo.partition(":")
    return dict(
        username=unquote(user) or None,
        password=unquote(password) if has_password else None,
        ssl=parts.scheme.startswith("rediss"),
    )


def _for_cluster(options: dict) -> dict:
    """The cluster client retries on its own (following a failover) rather than per
    connection: its `retry` is the cluster-wide one."""
    options = dict(options)
    options.pop("retry_on_error", None)
    if options.get("retry") is None:
        options["retry"] = Retry(ExponentialBackoff(cap=1.0, base=0.02), retries=0)
    return options


def is_cluster_client(client) -> bool:
    """Whether `client` talks to a Redis Cluster (blocking or asyncio)."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at `url` within the timeout. A wrong user or password
    raises `redis.AuthenticationError`: a Redis is there, and the user should know why."""
    try:
        client = connect(
            url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s, retry=None
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.AuthenticationError:
        raise
    except (*CONNECTION_ERRORS, OSError, redis.ResponseError):
        return False


class Backoff:
    """Exponential backoff with jitter for retry loops; `reset()` after a success."""

    def __init__(self, base_s: float = 0.05, cap_s: float = 2.0) -> None:
        self.base_s, self.cap_s = base_s, cap_s
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap_s, self.base_s * 2**self.failures)
        self.failures += 1
        return delay * random.uniform(0.5, 1.0)

    def sleep(self) -> None:
        time.sleep(self.next_delay())

    def reset(self) -> None:
        self.failures = 0


def retry_until(
    operation: Callable[[], T],
    give_up_after_s: float | None,
    backoff: Backoff | None = None,
    on_retry: Callable[[BaseException], None] | None = None,
) -> T:
    """Run `operation`, retrying connection errors with backoff for up to `give_up_after_s`
    (None: until it succeeds); `on_retry` hears of each failure that is retried."""
    backoff = backoff or Backoff()
    deadline = _deadline(give_up_after_s)
    while True:
        try:
            return operation()
        except CONNECTION_ERRORS as exc:
            if time.monotonic() >= deadline:
                raise
            if on_retry is not None:
                on_retry(exc)
            backoff.sleep()


async def retry_until_async(
    operation: Callable[[], Awaitable[T]],
    give_up_after_s: float | None,
    backoff: Backoff | None = None,
) -> T:
    """`retry_until` for coroutines: `operation()` is awaited, the backoff too."""
    backoff = backoff or Backoff()
    deadline = _deadline(give_up_after_s)
    while True:
        try:
            return await operation()
        except CONNECTION_ERRORS:
            if time.monotonic() >= deadline:
                raise
            await asyncio.sleep(backoff.next_delay())


def _deadline(give_up_after_s: float | None) -> float:
    return math.inf if give_up_after_s is None else time.monotonic() + give_up_after_s


def as_text(value, errors: str = "strict"):
    """A Redis reply value as text (redis-py gives bytes unless asked to decode); None and
    text pass through."""
    return value.decode(errors=errors) if isinstance(value, bytes) else value
