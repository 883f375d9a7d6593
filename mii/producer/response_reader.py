"""One reader of response streams per (client, event loop), for the asyncio client.

A process that follows many requests at once (a gateway streaming to 64 HTTP clients)
would otherwise make one XREAD round trip per request for nearly every token. Here every
request of the loop names the loop's reply stream, so workers write one entry a step for
all of them, and one task reads that stream, feeds each entry's chunks to the calls whose
requests they are (their `RequestSet`) and wakes those calls' `Follower`. Each call
keeps its own loop for everything else (deadlines, the check for lost requests, the
liveness key): `Client._afollow` waits on its follower where the blocking client waits on
its own XREAD.

A call follows its requests before it submits them, so no chunk of theirs can be read
before they are known. The reader stops when no request is followed and the next `follow`
starts it again, reading on from where it stopped.

When Redis is unreachable the reader retries with backoff for as long as streams are
followed; each call gives up with `BrokerUnavailableError` `reconnect_timeout_s` after
the reader began failing (or after the call began waiting, if later), as the blocking
client's own read would.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff, as_text
from mii.producer.outage import Abandoned
from mii.producer.request_set import PendingRequest, RequestSet
from mii.response import Response

BLOCK_MS = 1000  # a read returns when an entry comes; the reader stops at most this late


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
        key: str,
        reconnect_timeout_s: float,
        abandoned: Abandoned,
        cancel_abandoned: Callable[[], Awaitable[None]],
        block_ms: int = BLOCK_MS,
    ) -> None:
        """`redis`: the loop's redis.asyncio client; `key`: the loop's reply stream, which
        every request of the loop names. After a successful read, the requests in
        `abandoned` are cancelled with `cancel_abandoned()` (what a call cut off by an
        outage left)."""
        self.redis, self.key, self.block_ms = redis, key, block_ms
        self.reconnect_timeout_s = reconnect_timeout_s
        self.last_id = "0-0"  # of the reply stream: where the next read starts
        self.failing_since: float | None = None  # when the current run of failures began
        self.failure: BaseException | None = None
        self._abandoned, self._cancel_abandoned = abandoned, cancel_abandoned
        self._followers: dict[RequestSet, Follower] = {}
        self._by_rid: dict[str, Follower] = {}
        self._backoff = Backoff()
        self._task: asyncio.Task | None = None

    def follow(self, requests: RequestSet) -> Follower:
        """Feed `requests` what the reply stream brings them until `unfollow`. Follow
        before submitting: chunks read before a request is followed are not kept."""
        follower = Follower(requests)
        self._followers[requests] = follower
        self._by_rid.update((r.rid, follower) for r in requests.requests)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return follower

    def follower(self, requests: RequestSet) -> Follower:
        return self._followers[requests]

    def unfollow(self, requests: RequestSet) -> None:
        """Stop feeding `requests` (a no-op when they are not followed)."""
        if self._followers.pop(requests, None) is not None:
            for request in requests.requests:
                self._by_rid.pop(request.rid, None)

    def give_up_at(self, follower: Follower) -> float | None:
        """When `follower`'s call is to give up on Redis (monotonic time); None while the
        reader is not failing."""
        if self.failing_since is None:
            return None
        return max(self.failing_since, follower.since) + self.reconnect_timeout_s

    async def _run(self) -> None:
        try:
            while any(f.error is None and f.requests.open() for f in self._followers.values()):
                await self._read()
        finally:
            self._task = None

    async def _read(self) -> None:
        started = time.monotonic()
        try:
            reply = await self.redis.xread({self.key: self.last_id}, block=self.block_ms)
        except CONNECTION_ERRORS as exc:
            self._failed(started, exc)
            await asyncio.sleep(self._backoff.next_delay())
            return
        except Exception as exc:  # noqa: BLE001 (a reply no call can use: they all hear of it)
            for follower in list(self._followers.values()):
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
        """Each entry's chunks to the calls whose requests they are, in stream order."""
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = as_text(entry_id)
                self._deliver(fields)

    def _deliver(self, fields) -> None:
        try:
            chunks = wire.decode_reply(fields)
        except wire.WireError:
            return  # not for anyone here to read
        by_follower: dict[Follower, list] = {}
        for rid, chunk in chunks:
            follower = self._by_rid.get(rid)
            if follower is not None and follower.error is None:
                by_follower.setdefault(follower, []).append((rid, chunk))
        for follower, mine in by_follower.items():
            try:
                deltas = follower.requests.feed_chunks(mine)
            except Exception as exc:  # noqa: BLE001 (e.g. tokens out of order: that call fails)
                follower.fail(exc)
                continue
            if deltas:
                follower.deliver(deltas)
