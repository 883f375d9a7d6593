"""What a worker publishes, as records: `Batch` (one step's outputs, or one loop event) and
`Ending` (a request ended outside the engine: cancelled, timed out, refused, dead-lettered,
terminated). The publisher packs them for Redis; the bulk recorder reads them as they are.
Each builder below is one `Batch`: a final chunk on the request's stream (when it has a
readable id), the ack of its entry, maybe a dead-letter entry."""

from __future__ import annotations

from dataclasses import dataclass, field

from mii.broker_config import wire
from mii.broker_config.wire import ErrorKind
from mii.constants import GenerationFinishReason as Reason
from mii.engine.outputs import RequestOutput
from mii.worker.intake import Admission, Entry, Refusal, tagged


@dataclass(frozen=True)
class Ending:
    """How a request ended, for its final chunk (and its bulk line's result)."""

    rid: str
    reason: Reason
    plen: int = 0
    glen: int = 0
    error: str | None = None
    etype: ErrorKind | None = None
    entry: Entry | None = None
    """The request's entry, when known: where its final chunk goes (`Entry.reply`, none
    for a bulk line)."""

    @classmethod
    def of(cls, out: RequestOutput) -> Ending:
        """The ending of a request the engine finished."""
        etype = None if out.error is None else ErrorKind.GENERATION
        reason = out.finish_reason or Reason.NONE
        return cls(out.request_id, reason, out.prompt_length, out.generated_length, out.error,
                   etype)  # fmt: skip


@dataclass
class Batch:
    """What one engine step (or one loop event) publishes."""

    outputs: list[RequestOutput] = field(default_factory=list)
    entries: dict[str, Entry] = field(default_factory=dict)
    """The entry of each request with outputs here: where its chunks go."""
    endings: list[Ending] = field(default_factory=list)
    """Requests ended outside the engine."""
    acks: list[Entry] = field(default_factory=list)
    """Entries to acknowledge and delete once the chunks above are written."""
    deadletters: list[dict] = field(default_factory=list)
    """Entries (fields) to append to the dead-letter stream."""
    requeue: list[tuple[str, dict]] = field(default_factory=list)
    """(stream, fields) of handed-back requests, added before the acks of their old entries."""

    def __bool__(self) -> bool:
        return bool(self.outputs or self.endings or self.acks or self.deadletters or self.requeue)


def ended(adm: Admission, reason: Reason, generated: int) -> Batch:
    """A request stopped early (cancel, deadline): its final chunk, then its ack."""
    ending = Ending(adm.rid, reason, len(adm.prompt_token_ids), generated, entry=adm.entry)
    return Batch(endings=[ending], acks=[adm.entry])


def failed(adm: Admission, error: str, generated: int) -> Batch:
    """A request the worker cannot finish (the deployment was terminated): its error for
    the client, then its ack."""
    plen = len(adm.prompt_token_ids)
    kind = ErrorKind.GENERATION
    ending = Ending(adm.rid, Reason.ERROR, plen, generated, error, kind, entry=adm.entry)
    return Batch(endings=[ending], acks=[adm.entry])


def step_failure(adm: Admission, error: str) -> Refusal:
    """A request that broke the engine's steps too often: dead-lettered with its payload."""
    payload = wire.request_fields(adm.message)[wire.PAYLOAD]
    return Refusal(adm.entry, adm.rid, error, ErrorKind.GENERATION, payload)


def refused(consumer: str, refusal: Refusal, deadletter: bool) -> Batch:
    """An error for the client, the ack, and for entries nobody can be told about (or that
    kept killing workers) a copy in the dead-letter stream."""
    batch = Batch(acks=[refusal.entry])
    if refusal.rid is not None:
        ending = Ending(refusal.rid, Reason.ERROR, error=refusal.error, etype=refusal.kind,
                        entry=refusal.entry)  # fmt: skip
        batch.endings.append(ending)
    if deadletter or refusal.rid is None:
        batch.deadletters.append(_deadletter_fields(consumer, refusal))
    return batch


def too_many_deliveries(entry: Entry, rid: str | None, payload, limit: int) -> Refusal:
    error = (
        f"request was delivered {entry.deliveries} times (limit {limit}); each worker "
        "holding it died: dead-lettered"
    )
    entry = tagged(entry, _message(payload))  # a bulk line records this as its result
    return Refusal(entry, rid, error, ErrorKind.DEADLETTER, payload)


def _message(payload) -> wire.RequestMessage | None:
    try:
        return wire.unpack(wire.RequestMessage, payload)
    except wire.WireError:
        return None


def _deadletter_fields(consumer: str, refusal: Refusal) -> dict:
    return {
        "rid": refusal.rid or "",
        "stream": refusal.entry.stream,
        "entry_id": refusal.entry.entry_id,
        "deliveries": refusal.entry.deliveries,
        "error": refusal.error,
        "worker": consumer,
        wire.PAYLOAD: refusal.payload or b"",
    }
