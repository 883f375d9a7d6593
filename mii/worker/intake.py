"""Turning request-stream entries into engine work, or into a clear refusal.

Everything a client or a forger can put into an entry is checked here, before the engine
sees it: the wire schema, the generation options (`GenerateParams`), the prompt and its
length. A refusal names the request (when the entry has a readable id) so that its client
gets the error on its response stream instead of waiting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mii.broker_config import wire
from mii.broker_config.connection import as_text
from mii.broker_config.wire import ErrorKind, RequestMessage, WireError
from mii.engine.sampling_params import SamplingParams
from mii.errors import InvalidRequestError
from mii.params import GenerateParams, encode_prompt


@dataclass(frozen=True)
class JobLine:
    """The bulk job line a request serves: acking its entry records the line's result."""

    job: str
    line: int
    rid: str


@dataclass(frozen=True)
class Entry:
    """Where a request came from: its stream, its entry id and how often it was delivered."""

    stream: str
    entry_id: str
    deliveries: int = 1
    job: JobLine | None = field(default=None, compare=False)
    """Set once the entry is parsed, for a line of a bulk job (its result goes into the
    job; no chunk is published for it)."""
    reply: str | None = field(default=None, compare=False)
    """Set once the entry is parsed: the reply stream its request's chunks go to (None:
    the request's own response stream)."""

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
    def since_ms(self) -> int:
        """When the request was first queued (Redis clock, ms): its chunks are newer."""
        return self.message.since_ms or self.entry.added_ms

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


def readable_rid(fields: dict) -> str | None:
    raw = fields.get(wire.RID)
    if raw is None:
        return None
    try:
        rid = as_text(raw)
    except UnicodeDecodeError:
        return None
    return rid if _valid_rid(rid) else None


def _valid_rid(rid: str) -> bool:
    return 0 < len(rid) <= 64 and all(c.isalnum() or c in "_-" for c in rid) and rid.isascii()


def parse_entry(
    entry: Entry, fields: dict, tokenizer, max_model_len: int, max_bytes: int | None = None
):
    """An `Admission`, or a `Refusal` saying what is wrong with the entry (one larger than
    `max_bytes` is refused before it is decoded)."""
    size = len(fields.get(wire.PAYLOAD) or b"")
    if max_bytes is not None and size > max_bytes:
        error = f"request entry is {size} bytes, over this deployment's limit of {max_bytes}"
        return Refusal(entry, readable_rid(fields), error)
    try:
        message = wire.decode_request(fields)
    except WireError as exc:
        rid, payload = readable_rid(fields), fields.get(wire.PAYLOAD)
        return Refusal(entry, rid, f"malformed request entry: {exc}", payload=payload)
    plain_rid = readable_rid(fields)
    if plain_rid is not None and plain_rid != message.rid:
        return Refusal(entry, plain_rid, "request entry names two different request ids")
    entry = tagged(entry, message)
    try:
        params = GenerateParams.from_kwargs(**message.params)
        ids = prompt_token_ids(tokenizer, message)
        sampling = params.to_sampling_params(len(ids), max_model_len)
    except InvalidRequestError as exc:
        return Refusal(entry, message.rid, str(exc))
    return Admission(entry, message, ids, sampling)


def tagged(entry: Entry, message: RequestMessage | None) -> Entry:
    """The entry with where its request's answers go: the bulk job line it serves, or the
    reply stream its client reads."""
    if message is None:
        return entry
    job = None if message.job is None else JobLine(message.job, message.line, message.rid)
    return dataclasses.replace(entry, job=job, reply=message.reply)


def prompt_token_ids(tokenizer, message: RequestMessage) -> list[int]:
    """The prompt's ids; for a chat, those of the model's chat template applied to it (the
    worker has the tokenizer, so a submitter needs no model files)."""
    if message.messages is None:
        return encode_prompt(tokenizer, message.prompt)
    if tokenizer is None:
        raise InvalidRequestError("this model runs without a tokenizer: send token ids")
    if getattr(tokenizer, "chat_template", None) is None:
        raise InvalidRequestError("the model has no chat template: send a prompt, not messages")
    try:
        text = tokenizer.apply_chat_template(
            message.messages, add_generation_prompt=True, tokenize=False
        )
    except Exception as exc:  # noqa: BLE001 (a template can raise anything: jinja, roles, none set)
        raise InvalidRequestError(f"cannot apply the model's chat template: {exc}") from None
    if not text:
        raise InvalidRequestError("the chat template made an empty prompt")
    # the template writes the special tokens it wants (a BOS among them); add none twice
    return list(tokenizer.encode(text, add_special_tokens=False))


def requeue_fields(adm: Admission) -> dict[bytes, bytes]:
    """A handed-back request as a new entry: whoever reads it continues the tokens that
    were already published (since its first entry was queued) instead of starting over."""
    update = {"resume": True, "since_ms": adm.since_ms}
    return wire.request_fields(adm.message.model_copy(update=update))
