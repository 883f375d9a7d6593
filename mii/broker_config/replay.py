"""Replaying a response stream: what a reader makes of its chunks, each token index once.

A worker that takes over a request from a dead one continues from the tokens already in
the request's response stream, and may publish some of them again; every chunk says at
which token index it starts (`i`). A reader takes the tokens it has not seen yet, and a
chunk's text only when the whole chunk is new. The client joining its deltas, a worker
resuming a request and a worker recording a bulk line's whole text all read this way.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from mii.broker_config import wire
from mii.broker_config.wire import ResponseChunk, WireError


def take(chunk: ResponseChunk, seen: int) -> tuple[list[int], str] | None:
    """The tokens of `chunk` that a reader holding `seen` tokens lacks, and their text;
    None when the chunk starts past `seen` (a gap: earlier tokens are missing)."""
    if chunk.i > seen:
        return None
    fresh = chunk.ids[seen - chunk.i :]
    return fresh, chunk.text if len(fresh) == len(chunk.ids) else ""


@dataclass
class Replayed:
    """What a response stream holds, each token index once."""

    token_ids: list[int] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    final: ResponseChunk | None = None

    @property
    def text(self) -> str:
        return "".join(self.parts)


def replay(entries, upto: int | None = None, rid: str | None = None) -> Replayed:
    """Replay XRANGE `entries` of a request's response stream, or with `rid` of a reply
    stream (only that request's chunks), up to the first gap or to token index `upto`;
    undecodable entries are skipped."""
    out = Replayed()
    for chunk in _chunks(entries, rid):
        taken = take(chunk, len(out.token_ids))
        if taken is None or (upto is not None and chunk.i >= upto):
            break
        out.token_ids += taken[0]
        out.parts.append(taken[1])
        out.final = chunk if chunk.final else out.final
    return out


def _chunks(entries, rid: str | None) -> Iterator[ResponseChunk]:
    mark = None if rid is None else rid.encode()
    for _, fields in entries:
        if mark is not None and mark not in (fields.get(wire.PAYLOAD) or b""):
            continue  # a reply entry without this request's chunk: skip its decoding
        try:
            if rid is None:
                yield wire.decode_chunk(fields)
            else:
                yield from (c for r, c in wire.decode_reply(fields) if r == rid)
        except WireError:
            continue
