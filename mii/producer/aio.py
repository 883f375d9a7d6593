"""The asyncio half of `Client`: `agenerate` and `astream`, usable inside a running event
loop (notebooks, web servers). Each event loop gets its own redis.asyncio connection, since
those cannot cross loops."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Callable

import redis

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff, connect_async
from mii.broker_config.wire import ControlMessage
from mii.producer.request_set import RequestSet
from mii.producer.submit import SUBMIT_SCRIPT
from mii.response import Response

_CLEANUPS: set[asyncio.Task] = set()  # strong references while they run


async def _uncancellable(coro) -> None:
    """Run `coro` to its end even when the caller is cancelled: a web server cancels a
    request's task (repeatedly, under anyio) when its client disconnects, and the cleanup
    must still cancel the work that client left in the queue."""
    task = asyncio.ensure_future(coro)
    _CLEANUPS.add(task)
    task.add_done_callback(_CLEANUPS.discard)
    await asyncio.shield(task)


class AsyncClientMixin:
    def __init__(self, redis_url: str | None, async_redis_factory: Callable | None) -> None:
        self._async_factory = async_redis_factory or (lambda: connect_async(redis_url))
        self._per_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _aredis(self):
        loop = asyncio.get_running_loop()
        if loop not in self._per_loop:
            client = self._async_factory()
            self._per_loop[loop] = (client, client.register_script(SUBMIT_SCRIPT))
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
            async for _, delta in self._afollow(requests):
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
        index = {r.rid: i for i, r in enumerate(requests.requests)}
        try:
            async for request, delta in self._afollow(requests):
                yield index[request.rid], delta
            requests.responses()
        finally:
            await _uncancellable(self._acleanup(requests))

    async def _asubmit(self, prompts, kwargs: dict, stream: str | None = None) -> RequestSet:
        sub = self._prepare(prompts, kwargs, stream)
        _, script = self._aredis()
        args = sub.script_args()
        try:
            await self._aretry(lambda: script(keys=[sub.stream], args=args))
        except redis.ResponseError as exc:
            raise sub.refusal(exc) from None
        return sub.requests

    async def _afollow(self, requests: RequestSet):
        client, _ = self._aredis()
        while not requests.done:
            requests.check_deadlines()
            streams, block = requests.streams(), requests.block_ms()
            reply = await self._aretry(lambda s=streams, b=block: client.xread(s, block=b))
            for item in requests.feed(reply):
                yield item
            failed = requests.failed()
            if failed is not None:
                failed.assembler.response()

    async def _acleanup(self, requests: RequestSet) -> None:
        client, _ = self._aredis()
        try:
            pipe = client.pipeline(transaction=False)
            for request in requests.open():
                pipe.set(self.keys.cancelled(request.rid), 1, ex=self.settings.response_ttl_s)
                fields = wire.control_fields(ControlMessage(op="cancel", rid=request.rid))
                pipe.xadd(self.keys.control, fields, maxlen=self.settings.control_maxlen)
            if self.delete_responses:
                pipe.delete(*[r.key for r in requests.requests])
            await pipe.execute()
        except CONNECTION_ERRORS:
            pass  # the responses expire on their own

    async def _aretry(self, operation):
        backoff, give_up = Backoff(), time.monotonic() + self.settings.reconnect_timeout_s
        while True:
            try:
                return await operation()
            except CONNECTION_ERRORS:
                if time.monotonic() > give_up:
                    raise
                await asyncio.sleep(backoff.next_delay())
