"""Turning request-stream entries into engine work, or into a clear refusal.

Everything a client or a forger can put into an entry is checked here, before the engine
sees it: the wire schema, the generation options (`GenerateParams`), the prompt and its
length. A refusal names the request (when the entry has a readable id) so that its client
gets the error on its response stream instead of waiting.
"""

from __future__ import annotations

from dataclasses import dataclass

from mii.broker_config import wire
from mii.broker_config.wire import ErrorKind, RequestMessage, WireError
from mii.engine.sampling_params import SamplingParams
from mii.errors import InvalidRequestError
from mii.params import GenerateParams, encode_prompt


@dataclass(frozen=True)
class Entry:
    """Where a request came from: its stream, its entry id and how often it was delivered."""

    stream: str
    entry_id: str
    deliveries: int = 1

    @property
    def added_ms(self) -> int:
        """The Redis server's clock when the entry was added (the id's first half)."""
        return int(self.entry_id.split("-", 1)[0])


@dataclass(frozen=True)
class Admission:
    """A request ready for `engine.add_request`."""

    entry: Entry
    message: RequestMessage
    prompt_token_ids: list[int]
    sampling: SamplingParams

    @property
    def rid(self) -> str:
        return self.message.rid

    @property
    def deadline(self) -> float | None:
        """Redis-clock seconds after which the request times out."""
        if self.message.timeout_s is None:
            return None
        return self.entry.added_ms / 1000 + self.message.timeout_s


@dataclass(frozen=True)
class Refusal:
    """An entry that cannot be served; `rid` is None when not even the id is readable."""

    entry: Entry
    rid: str | None
    error: str
    kind: ErrorKind = ErrorKind.INVALID_REQUEST
    payload: bytes | None = None
    """The entry's raw payload, kept for the dead-letter stream."""


def _decode(text: bytes | str) -> str:
    return text.decode() if isinstance(text, bytes) else text


def readable_rid(fields: dict) -> str | None:
    raw = fields.get(wire.RID)
    if raw is None:
        return None
    try:
        rid = _decode(raw)
    except UnicodeDecodeError:
        return None
    return rid if _valid_rid(rid) else None


def _valid_rid(rid: str) -> bool:
    return 0 < len(rid) <= 64 and all(c.isalnum() or c in "_-" for c in rid) and rid.isascii()


def parse_entry(entry: Entry, fields: dict, tokenizer, max_model_len: int):
    """An `Admission`, or a `Refusal` saying what is wrong with the entry."""
    try:
        message = wire.decode_request(fields)
    except WireError as exc:
        rid, payload = readable_rid(fields), fields.get(wire.PAYLOAD)
        return Refusal(entry, rid, f"malformed request entry: {exc}", payload=payload)
    plain_rid = readable_rid(fields)
    if plain_rid is not None and plain_rid != message.rid:
        return Refusal(entry, plain_rid, "request entry names two different request ids")
    try:
        params = GenerateParams.from_kwargs(**message.params)
        ids = encode_prompt(tokenizer, message.prompt)
        sampling = params.to_sampling_params(len(ids), max_model_len)
    except InvalidRequestError as exc:
        return Refusal(entry, message.rid, str(exc))
    return Admission(entry, message, ids, sampling)


def requeue_fields(message: RequestMessage) -> dict[bytes, bytes]:
    """A handed-back request as a new entry: whoever reads it continues the tokens that
    were already published instead of starting over."""
    return wire.request_fields(message.model_copy(update={"resume": True}))
