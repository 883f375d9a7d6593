"""One reader of response streams per (client, event loop), for the asyncio client.

A process that follows many requests at once (a gateway streaming to 64 HTTP clients)
would otherwise make one XREAD round trip per request for nearly every token. Here one
task reads every stream that the loop's calls follow, in one XREAD (at most
`MAX_STREAMS_PER_READ` streams a call; past that, several calls at once), feeds each
stream's entries to its call's `RequestSet` and wakes that call's `Follower`. Each call
keeps its own loop for everything else (deadlines, the check for lost requests, the
liveness key): `Client._afollow` waits on its follower where the blocking client waits on
its own XREAD.

A stream registered while a read is in flight joins the next read: reads block at most
`BLOCK_MS`, and while tokens flow they return at every engine step anyway. A new request
finds the reader idle when nothing else is followed (the reader stops when no stream is
left to read; the next `follow` starts it again), so one request at a time waits for no one.

When Redis is unreachable the reader retries with backoff for as long as streams are
followed; each call gives up with `BrokerUnavailableError` `reconnect_timeout_s` after
the reader began failing (or after the call began waiting, if later), as the blocking
client's own read would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.producer.outage import Abandoned
from mii.producer.request_set import MAX_STREAMS_PER_READ, PendingRequest, RequestSet
from mii.response import Response

BLOCK_MS = 10  # how long a stream registered during a read may wait for the next one


class Follower:
    """One call's requests, and what the reader fed them that the call has not taken."""

    def __init__(self, requests: RequestSet) -> None:
        self.requests = requests
        self.since = time.monotonic()
        self.error: BaseException | None = None
        self._ready: list[tuple[PendingRequest, Response]] = []
        self._waiter: asyncio.Future | None = None

    @property
    def ready(self) -> bool:
        """Whether deltas wait to be taken."""
        return bool(self._ready)

    def take(self) -> list[tuple[PendingRequest, Response]]:
        """The deltas fed since the last `take`, in arrival order."""
        ready, self._ready = self._ready, []
        return ready

    def raise_error(self) -> None:
        """Raise what made the reader give up on these requests, if anything did."""
        if self.error is not None:
            raise self.error

    async def wait(self, timeout_s: float) -> None:
        """Until the reader feeds something or fails, or `timeout_s` passes."""
        if self._ready or self.error is not None:
            return
        loop = asyncio.get_running_loop()
        self._waiter = loop.create_future()
        timer = loop.call_later(max(0.0, timeout_s), self.wake)
        try:
            await self._waiter
        finally:
            timer.cancel()
            self._waiter = None

    def wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def deliver(self, deltas: list[tuple[PendingRequest, Response]]) -> None:
        self._ready.extend(deltas)
        self.wake()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.wake()


class ResponseReader:
    def __init__(
        self,
        redis,
        reconnect_timeout_s: float,
        abandoned: Abandoned,
        cancel_abandoned: Callable[[], Awaitable[None]],
        block_ms: int = BLOCK_MS,
    ) -> None:
        """`redis`: the loop's redis.asyncio client. After a successful read, the requests
        in `abandoned` are cancelled with `cancel_abandoned()` (what a call cut off by an
        outage left)."""
        self.redis, self.block_ms = redis, block_ms
        self.reconnect_timeout_s = reconnect_timeout_s
        self.failing_since: float | None = None  # when the current run of failures began
        self.failure: BaseException | None = None
        self._abandoned, self._cancel_abandoned = abandoned, cancel_abandoned
        self._followers: dict[RequestSet, Follower] = {}
        self._by_key: dict[str, Follower] = {}
        self._backoff = Backoff()
        self._task: asyncio.Task | None = None

    def follow(self, requests: RequestSet) -> Follower:
        """Read `requests`' response streams from their last ids until `unfollow`."""
        follower = Follower(requests)
        self._followers[requests] = follower
        self._by_key.update((r.key, follower) for r in requests.requests)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return follower

    def unfollow(self, requests: RequestSet) -> None:
        """Stop reading `requests`' streams (a no-op when they are not followed)."""
        follower = self._followers.pop(requests, None)
        if follower is not None:
            for request in requests.requests:
                if self._by_key.get(request.key) is follower:
                    del self._by_key[request.key]

    def give_up_at(self, follower: Follower) -> float | None:
        """When `follower`'s call is to give up on Redis (monotonic time); None while the
        reader is not failing."""
        if self.failing_since is None:
            return None
        return max(self.failing_since, follower.since) + self.reconnect_timeout_s

    async def _run(self) -> None:
        try:
            while True:
                batches = self._batches()
                if not batches:
                    return
                if len(batches) == 1:
                    await self._read(batches[0])
                else:
                    await asyncio.gather(*(self._read(batch) for batch in batches))
        finally:
            self._task = None

    def _batches(self) -> list[dict[str, str]]:
        """XREAD arguments: every followed stream from its last id, in batches."""
        streams: dict[str, str] = {}
        for follower in self._followers.values():
            if follower.error is None:
                streams.update((r.key, r.assembler.last_id) for r in follower.requests.open())
        keys = list(streams)
        return [
            {key: streams[key] for key in keys[i : i + MAX_STREAMS_PER_READ]}
            for i in range(0, len(keys), MAX_STREAMS_PER_READ)
        ]

    async def _read(self, streams: dict[str, str]) -> None:
        started = time.monotonic()
        try:
            reply = await self.redis.xread(streams, block=self.block_ms)
        except CONNECTION_ERRORS as exc:
            self._failed(started, exc)
            await asyncio.sleep(self._backoff.next_delay())
            return
        except Exception as exc:  # noqa: BLE001 (a reply no call can use: they all hear of it)
            for key in streams:
                follower = self._by_key.get(key)
                if follower is not None:
                    follower.fail(exc)
            return
        self.failing_since, self.failure = None, None
        self._backoff.reset()
        self._dispatch(reply)
        if self._abandoned:
            await self._cancel_abandoned()

    def _failed(self, started: float, exc: BaseException) -> None:
        if self.failing_since is None:
            self.failing_since = started
        self.failure = exc
        for follower in self._followers.values():
            follower.wake()  # each decides whether to give up

    def _dispatch(self, reply) -> None:
        for key, entries in reply or []:
            follower = self._by_key.get(key.decode() if isinstance(key, bytes) else key)
            if follower is None or follower.error is not None:
                continue  # unfollowed while the read was in flight
            try:
                deltas = follower.requests.feed([(key, entries)])
            except Exception as exc:  # noqa: BLE001 (e.g. tokens out of order: that call fails)
                follower.fail(exc)
                continue
            if deltas:
                follower.deliver(deltas)
