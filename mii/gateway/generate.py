"""Answering a `GenerationRequest` through the deployment's asyncio client: whole, or
streamed as server-sent events (`data: {chunk}` ... `data: [DONE]`).

A streamed request waits for its first delta before the response starts, so a refusal
(bad options, a full queue, a prompt the worker rejects, a deadline) is still an HTTP
status; an error after that is a last `data: {"error": ...}` event. The deltas that
arrived together go out as one body chunk: a busy gateway falls behind by whole steps,
and catches up with one write per request rather than one per token. A client that
disconnects cancels its requests: the client library's cleanup runs even though the
server cancels the task that streamed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable

from starlette.responses import JSONResponse, StreamingResponse

from mii.gateway.deployment import Deployment
from mii.gateway.errors import ClientGone, api_error
from mii.gateway.metrics import GatewayMetrics, Timing
from mii.gateway.requests import GenerationRequest
from mii.gateway.shapes import Shape, shape_for, usage
from mii.response import Response

DONE = b"data: [DONE]\n\n"


def sse_event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


async def unless_disconnected(http_request, work: Awaitable):
    """`work`'s result, or `ClientGone` as soon as the client hangs up: the work is then
    cancelled (and with it the requests it queued)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnect(http_request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, watcher):
            if not pending.done():
                pending.cancel()
    if not task.done() or task.cancelled():
        raise ClientGone()
    return task.result()


async def _disconnect(http_request) -> None:
    while (await http_request.receive())["type"] != "http.disconnect":
        pass


async def answer(
    deployment: Deployment, request: GenerationRequest, metrics: GatewayMetrics, http_request
):
    """The HTTP response to a completions or chat request (`http_request`: Starlette's,
    watched for a disconnect while a whole answer is generated)."""
    deployment.check_model(request.model)
    await deployment.require_live_worker()
    shape = shape_for(request, request.model or deployment.name)
    timing = Timing(metrics, request.endpoint)
    options = dict(request.options, n=request.n, timeout=deployment.timeout_s)
    client = deployment.client
    if not request.stream:
        work = client.agenerate(request.prompts, **options)
        responses = await unless_disconnected(http_request, work)
        body = shape.body(responses)
        timing.done(body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])
        return JSONResponse(body)
    batches = client.astream_batches(request.prompts, **options)
    first = await anext(batches)  # a refusal raises here, before any byte is sent
    events = _events(shape, first, batches, timing, deployment.settings.retry_after_s)
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


async def _events(
    shape: Shape,
    first: list[tuple[int, Response]],
    rest: AsyncIterator[list[tuple[int, Response]]],
    timing: Timing,
    retry_after_s: int,
) -> AsyncIterator[bytes]:
    tally = _Tally(shape.request.n)
    try:
        yield _pieces(shape, tally, timing, first)
        async for batch in rest:
            yield _pieces(shape, tally, timing, batch)
        if shape.request.include_usage:
            yield sse_event(shape.usage_chunk(tally.usage()))
        timing.done(*tally.totals())
    except Exception as exc:  # noqa: BLE001 (the client hears of any failure as an event)
        yield sse_event(api_error(exc, retry_after_s).body())
    finally:
        await rest.aclose()  # cancels what still runs (a no-op once it ended)
    yield DONE


def _pieces(
    shape: Shape, tally: _Tally, timing: Timing, batch: list[tuple[int, Response]]
) -> bytes:
    """The events of the deltas in `batch`, as one body chunk."""
    return b"".join(_piece(shape, tally, timing, index, delta) for index, delta in batch)


def _piece(shape: Shape, tally: _Tally, timing: Timing, index: int, delta: Response) -> bytes:
    if delta.token_ids:
        timing.token()
    first = tally.add(index, delta)
    return sse_event(shape.chunk([shape.delta_choice(index, delta, first)]))


class _Tally:
    """Which choices have started, and the usage they add up to."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}  # choice -> prompt tokens
        self.generated: dict[int, int] = {}  # choice -> generated tokens

    def add(self, index: int, delta: Response) -> bool:
        """Record a delta; whether it is the choice's first."""
        first = index not in self.generated
        self.prompt[index] = delta.prompt_length or self.prompt.get(index, 0)
        self.generated[index] = delta.generated_length
        return first

    def totals(self) -> tuple[int, int]:
        prompts = sum(p for i, p in self.prompt.items() if i % self.n == 0)
        return prompts, sum(self.generated.values())

    def usage(self) -> dict:
        prompts, generated = self.totals()
        return usage([prompts], generated)
