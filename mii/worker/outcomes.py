"""What a worker publishes for requests the engine does not finish: cancelled, timed out,
refused (bad input), dead-lettered. Each is one `Batch`: a final chunk on the request's
stream (when it has a readable id), the ack of its entry, maybe a dead-letter entry."""

from __future__ import annotations

from mii.broker_config import wire
from mii.constants import GenerationFinishReason as Reason
from mii.worker.intake import Admission, Entry, Refusal, tag_job
from mii.worker.publisher import Batch, final_chunk


def ended(consumer: str, adm: Admission, reason: Reason, generated: int) -> Batch:
    """A request stopped early (cancel, deadline): its final chunk, then its ack."""
    plen = len(adm.prompt_token_ids)
    payload = final_chunk(consumer, reason, plen=plen, glen=generated)
    return Batch(finals=[(adm.rid, payload)], acks=[adm.entry])


def failed(consumer: str, adm: Admission, error: str, generated: int) -> Batch:
    """A request the worker cannot finish (the deployment was terminated): its error for
    the client, then its ack."""
    plen = len(adm.prompt_token_ids)
    payload = final_chunk(consumer, Reason.ERROR, error=error, plen=plen, glen=generated)
    return Batch(finals=[(adm.rid, payload)], acks=[adm.entry])


def step_failure(adm: Admission, error: str) -> Refusal:
    """A request that broke the engine's steps too often: dead-lettered with its payload."""
    payload = wire.request_fields(adm.message)[wire.PAYLOAD]
    return Refusal(adm.entry, adm.rid, error, wire.ErrorKind.GENERATION, payload)


def refused(consumer: str, refusal: Refusal, deadletter: bool) -> Batch:
    """An error for the client, the ack, and for entries nobody can be told about (or that
    kept killing workers) a copy in the dead-letter stream."""
    batch = Batch(acks=[refusal.entry])
    if refusal.rid is not None:
        payload = final_chunk(consumer, Reason.ERROR, error=refusal.error, etype=refusal.kind)
        batch.finals.append((refusal.rid, payload))
    if deadletter or refusal.rid is None:
        batch.deadletters.append(_deadletter_fields(consumer, refusal))
    return batch


def too_many_deliveries(entry: Entry, rid: str | None, payload, limit: int) -> Refusal:
    error = (
        f"request was delivered {entry.deliveries} times (limit {limit}); each worker "
        "holding it died: dead-lettered"
    )
    entry = tag_job(entry, _message(payload))  # a bulk line records this as its result
    return Refusal(entry, rid, error, wire.ErrorKind.DEADLETTER, payload)


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
