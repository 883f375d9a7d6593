"""The requests one client call waits on: which streams to read from where, what arrived,
which deadlines passed. No I/O here: the blocking and the asyncio clients drive it."""

from __future__ import annotations

import time
from dataclasses import dataclass

from mii.broker_config import wire
from mii.broker_config.connection import as_text
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.wire import RequestMessage, ResponseChunk
from mii.errors import RequestTimeoutError
from mii.params import GenerateParams
from mii.producer.assembler import ResponseAssembler
from mii.response import Response

DEADLINE_GRACE_S = 2.0  # a worker reports a passed deadline itself; wait that long for it
MAX_BLOCK_MS = 1000


@dataclass
class PendingRequest:
    message: RequestMessage
    key: str  # the reply stream its chunks arrive on (shared with the call's other requests)
    assembler: ResponseAssembler
    give_up_at: float | None  # monotonic time after which the client stops waiting
    heard_at: float  # monotonic time of the last sign of life (its submit, a chunk, a check)
    stream: str | None = None  # where its entry was queued, if this client queued it
    entry_id: str | None = None

    @property
    def rid(self) -> str:
        return self.message.rid

    @property
    def done(self) -> bool:
        return self.assembler.done


class RequestSet:
    """Requests whose chunks arrive on one reply stream (`keys.replies(reply)`): workers
    publish one entry a step for all of a reply stream's requests they serve."""

    def __init__(
        self,
        keys: DeploymentKeys,
        messages: list[RequestMessage],
        params: GenerateParams,
        reply: str,
    ) -> None:
        now = time.monotonic()
        self.reply, self.key = reply, keys.replies(reply)
        self.last_id = "0-0"  # of the reply stream, where this call's own reads resume
        self.requests = [
            PendingRequest(
                message=m,
                key=self.key,
                assembler=ResponseAssembler(m.rid, m.prompt, params),
                give_up_at=None if m.timeout_s is None else now + m.timeout_s + DEADLINE_GRACE_S,
                heard_at=now,
            )
            for m in messages
        ]
        self.by_rid = {r.rid: r for r in self.requests}

    @property
    def done(self) -> bool:
        return all(r.done for r in self.requests)

    def open(self) -> list[PendingRequest]:
        return [r for r in self.requests if not r.done]

    def queued_at(self, stream: str, entry_ids: list) -> None:
        """Record the entry ids the submit script returned, one per request in order."""
        for request, entry_id in zip(self.requests, entry_ids, strict=True):
            request.stream = stream
            request.entry_id = as_text(entry_id)

    def silent(self, for_s: float) -> list[PendingRequest]:
        """Unfinished requests of which nothing was heard for `for_s` seconds."""
        since = time.monotonic() - for_s
        return [r for r in self.open() if r.heard_at <= since]

    def streams(self) -> dict[str, str]:
        """XREAD arguments: the reply stream from the last id seen (nothing once done)."""
        return {self.key: self.last_id} if self.open() else {}

    def block_ms(self, check_after_s: float | None = None, wake_at: float | None = None) -> int:
        """How long the next read may block: until the nearest deadline, until a request
        falls silent for `check_after_s` (then the client asks after it), or `wake_at`."""
        ends = [r.give_up_at for r in self.open() if r.give_up_at is not None]
        if check_after_s is not None:
            ends += [r.heard_at + check_after_s for r in self.open()]
        if wake_at is not None:
            ends.append(wake_at)
        if not ends:
            return MAX_BLOCK_MS
        left = min(ends) - time.monotonic()
        return max(1, min(MAX_BLOCK_MS, int(left * 1000)))

    def feed(self, reply) -> list[tuple[PendingRequest, Response]]:
        """Take an XREAD reply of the reply stream; return the new deltas in arrival order
        (chunks of requests that are not this call's are skipped)."""
        deltas = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.last_id = as_text(entry_id)
                deltas += self.feed_chunks(wire.decode_reply(fields))
        return deltas

    def feed_chunks(self, chunks: list[tuple[str, ResponseChunk]]) -> list:
        """Feed decoded chunks in stream order; return the new `(request, delta)` pairs."""
        deltas, now = [], time.monotonic()
        for rid, chunk in chunks:
            request = self.by_rid.get(rid)
            if request is None:
                continue
            request.heard_at = now
            delta = request.assembler.feed(chunk)
            if delta is not None:
                deltas.append((request, delta))
        return deltas

    def failed(self) -> PendingRequest | None:
        return next((r for r in self.requests if r.assembler.error is not None), None)

    def check_deadlines(self) -> None:
        """Raise when a request is past its deadline and no worker said so (none alive)."""
        now = time.monotonic()
        late = [r for r in self.open() if r.give_up_at is not None and now > r.give_up_at]
        if late:
            raise RequestTimeoutError(
                f"request {late[0].rid} got no answer within its timeout of "
                f"{late[0].message.timeout_s}s (are any workers serving this deployment?)"
            )

    def responses(self) -> list[Response]:
        return [r.assembler.response() for r in self.requests]
