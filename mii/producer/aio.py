"""The asyncio half of `Client`: `agenerate` and `astream`, usable inside a running event
loop (notebooks, web servers). Each event loop gets its own redis.asyncio connection, since
those cannot cross loops, and its own `ResponseReader`: one task reads the response
streams of every call waiting on that loop. Every decision (validation, the submit script,
deadlines, liveness, the check for lost requests, what an outage abandons) is the blocking
client's; only the I/O differs."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass

import redis

from mii.broker_config.connection import CONNECTION_ERRORS, connect_async, retry_until_async
from mii.producer.request_set import RequestSet
from mii.producer.response_reader import Follower, ResponseReader
from mii.producer.submit import SUBMIT_SCRIPT
from mii.response import Response

log = logging.getLogger(__name__)
_CLEANUPS: set[asyncio.Task] = set()  # strong references while they run


async def _uncancellable(coro) -> None:
    """Run `coro` to its end even when the caller is cancelled: a web server cancels a
    request's task (repeatedly, under anyio) when its client disconnects, and the cleanup
    must still cancel the work that client left in the queue."""
    task = asyncio.ensure_future(coro)
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
    await asyncio.shield(task)


@dataclass
class _LoopRedis:
    """What one event loop uses: its connection, the submit script on it, and for each
    partition of the deployment a reply stream and its reader (the stream's name falls in
    the partition: the requests that name it are queued there)."""

    redis: object  # redis.asyncio.Redis or RedisCluster (or fakeredis's)
    submit: object  # AsyncScript
    replies: list[str]  # per partition: the name its requests give as their `reply`
    readers: list[ResponseReader]
    turn: int = 0

    def next_partition(self) -> int:
        """The partition of the next call: each in turn, so the calls of one loop (a
        gateway's) spread over all of them."""
        self.turn = (self.turn + 1) % len(self.replies)
        return self.turn

    def reader_of(self, requests: RequestSet) -> ResponseReader:
        return self.readers[self.replies.index(requests.reply)]


class AsyncClientMixin:
    def __init__(self, redis_url: str | None, async_redis_factory: Callable | None) -> None:
        self._async_factory = async_redis_factory or (lambda: connect_async(redis_url))
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _aredis(self) -> _LoopRedis:
        loop = asyncio.get_running_loop()
        if loop not in self._per_loop:
            client = self._async_factory()
            replies = [self.keys.new_id(p) for p in range(self.keys.partitions)]
            readers = [
                ResponseReader(
                    client,
                    self.keys.replies(reply),
                    self.settings.reconnect_timeout_s,
                    self._abandoned,
                    lambda: self._acancel_now(()),
                )
                for reply in replies
            ]
            script = client.register_script(SUBMIT_SCRIPT)
            self._per_loop[loop] = _LoopRedis(client, script, replies, readers)
        return self._per_loop[loop]

    async def agenerate(self, prompts, **kwargs) -> list[Response]:
        """`generate` for asyncio: one `Response` per prompt."""
        requests = await self._asubmit(prompts, kwargs)
        try:
            async for _ in self._afollow(requests):
                pass
        finally:
            await _uncancellable(self._acleanup(requests))
        return requests.responses()

    async def astream(self, prompt, **kwargs) -> AsyncIterator[Response]:
        """`stream` for asyncio: `async for delta in client.astream(prompt)`."""
        requests = await self._asubmit(self._single(prompt), kwargs)
        try:
            async for batch in self._afollow(requests):
                for _, delta in batch:
                    yield delta
            requests.responses()
        finally:
            await _uncancellable(self._acleanup(requests))

    async def astream_many(self, prompts, **kwargs) -> AsyncIterator[tuple[int, Response]]:
        """Stream several requests at once: `(index, delta)` as chunks arrive, where index
        counts the requests in submit order (with `n=`, prompt-major: prompt p's choice c is
        p * n + c). Each request's last delta carries its finish reason; a worker's error
        is raised after the deltas before it. Closing the iterator cancels what runs."""
        requests = await self._asubmit(prompts, kwargs)
        try:
            async for batch in self._aindexed(requests):
                for item in batch:
                    yield item
            requests.responses()
        finally:
            await _uncancellable(self._acleanup(requests))

    async def astream_batches(self, prompts, **kwargs) -> AsyncIterator[list[tuple[int, Response]]]:
        """`astream_many`, a list at a time: every `(index, delta)` that arrived since the
        last list, in arrival order (never empty). A consumer that falls behind catches up
        in fewer, larger steps: the gateway writes one HTTP body chunk per list."""
        requests = await self._asubmit(prompts, kwargs)
        try:
            async for batch in self._aindexed(requests):
                yield batch
            requests.responses()
        finally:
            await _uncancellable(self._acleanup(requests))

    async def _aindexed(self, requests: RequestSet):
        """`_afollow`'s lists with each request's index in submit order."""
        index = {r.rid: i for i, r in enumerate(requests.requests)}
        async for batch in self._afollow(requests):
            yield [(index[request.rid], delta) for request, delta in batch]

    async def _asubmit(self, prompts, kwargs: dict, stream: str | None = None) -> RequestSet:
        """Queue the requests, followed by the loop's reader from before they are queued
        (a worker may answer before this call reads)."""
        loop_redis = self._aredis()
        reply = loop_redis.replies[loop_redis.next_partition()]
        sub = self._prepare(prompts, kwargs, stream, reply)
        keys, args = sub.script_keys(), sub.script_args()
        if sub.checked_apart:
            pipe = sub.precheck(loop_redis.redis.pipeline(transaction=False))
            sub.prechecked(await self._acall(pipe.execute))
        reader = loop_redis.reader_of(sub.requests)
        reader.follow(sub.requests)
        try:
            ids = await self._acall(lambda: loop_redis.submit(keys=keys, args=args), sub.rids())
        except redis.ResponseError as exc:
            reader.unfollow(sub.requests)
            raise sub.refusal(exc) from None
        except BaseException:
            reader.unfollow(sub.requests)
            raise
        self._liveness.refreshed()
        return sub.accepted(ids)

    async def _afollow(self, requests: RequestSet):
        """`_follow` for asyncio, a list of `(request, delta)` at a time (what arrived since
        the last): the loop's reader reads the streams, this call waits for its deltas."""
        reader = self._aredis().reader_of(requests)
        follower = reader.follower(requests)
        try:
            while True:
                batch = follower.take()
                if batch:
                    yield batch
                give_up_at = None
                if not follower.ready:  # else more came while the caller had the batch
                    self._check_ended(requests, follower)
                    if requests.done:
                        return
                    requests.check_deadlines()
                    give_up_at = self._check_reader(reader, follower)
                await self._aupkeep(requests)
                wait_s = self._block_ms(requests) / 1000
                if give_up_at is not None:
                    wait_s = min(wait_s, give_up_at - time.monotonic())
                await follower.wait(wait_s)
        finally:
            reader.unfollow(requests)

    @staticmethod
    def _check_ended(requests: RequestSet, follower: Follower) -> None:
        """Raise a request's error, or the reader's for this call, once its deltas are out."""
        follower.raise_error()
        failed = requests.failed()
        if failed is not None:
            failed.assembler.response()  # raises its error

    def _check_reader(self, reader: ResponseReader, follower: Follower) -> float | None:
        """`BrokerUnavailableError` once the reader failed for `reconnect_timeout_s` of
        this call's wait; else when that would be (None while it reads)."""
        give_up_at = reader.give_up_at(follower)
        if give_up_at is not None and time.monotonic() >= give_up_at:
            raise self._gave_up(reader.failure, ()) from reader.failure
        return give_up_at

    async def _aupkeep(self, requests: RequestSet) -> None:
        """`_upkeep` for asyncio."""
        client = self._aredis().redis
        if self._liveness.due():
            key, ttl = self._liveness.key, self._liveness.ttl_s
            await self._acall(lambda: client.set(key, 1, ex=ttl))
        suspects = self._presence.suspects(requests)
        if suspects:
            replies = await self._acall(
                lambda: self._presence.queue(client.pipeline(False), suspects).execute()
            )
            self._presence.judge(suspects, replies)

    async def _acleanup(self, requests: RequestSet) -> None:
        """Stop following; cancel what still runs (the loop's reply stream stays: other
        calls read it, and its entries expire)."""
        self._aredis().reader_of(requests).unfollow(requests)
        await self._acancel_now([r.rid for r in requests.open()])

    async def _acancel_now(self, rids: Iterable[str], delete: Sequence[str] = ()) -> None:
        """`_cancel_now` for asyncio."""
        client = self._aredis().redis
        rids = [*rids, *self._abandoned.take()]
        try:
            await self._cancel_pipe(client.pipeline(False), rids, delete).execute()
        except CONNECTION_ERRORS:
            self._abandoned.add(rids)
            log.warning("Redis unreachable: %d request(s) will be cancelled later", len(rids))

    async def _acall(self, operation, abandon: Iterable[str] = ()):
        """`_call` for asyncio."""
        try:
            result = await retry_until_async(operation, self.settings.reconnect_timeout_s)
        except CONNECTION_ERRORS as exc:
            raise self._gave_up(exc, abandon) from exc
        if self._abandoned:
            await self._acancel_now(())
        return result
