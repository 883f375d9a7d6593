"""The wire contract: msgpack maps, validated by pydantic, versioned. No pickle anywhere.

Request stream entry (`mii:{dep}:requests` / `:bulk`), two fields:
    rid  the request id (plain, so that even an undecodable entry can be answered)
    m    msgpack of `RequestMessage`

Response stream entry (`mii:{dep}:resp:{rid}`), one field:
    m    msgpack of `ResponseChunk`; the chunk with `reason` set is the last one

Reply stream entry (`mii:{dep}:replies:{name}`, for requests that name a `reply` stream),
one field:
    m    msgpack of `{"v": 1, "c": {rid: ResponseChunk, ...}}`: one engine step's chunks of
         every request of that reply stream that a worker serves (one XADD for them all)

Control stream entry (`mii:{dep}:control`), one field:
    m    msgpack of `ControlMessage` (cancel one request, or terminate the deployment)

A reader refuses a message whose `v` it does not know; a new version adds fields with
defaults, so old messages stay readable. Request messages are at version 3 (`reply`), 2
(`messages`, `job`, `line`) or 1: each is written at the lowest version that carries it,
so workers of a previous release keep reading what they can during a rolling upgrade. Response
chunks follow the same rule: version 2 (`toks`, `top`) only for a request that asked for
logprobs, version 1 otherwise.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mii.constants import GenerationFinishReason
from mii.errors import MIIError

WIRE_VERSION = 1
REQUEST_WIRE_VERSION = 3
CHUNK_WIRE_VERSION = 2
REPLY_WIRE_VERSION = 1
PAYLOAD = b"m"
RID = b"rid"
_RID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
_JOB_PATTERN = r"^[A-Za-z0-9_-]{1,48}$"
REPLY_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class WireError(MIIError):
    """A message that is not msgpack, not a map, or does not match its schema."""


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = WIRE_VERSION


class RequestMessage(_Message):
    """One generation request, as a client submits it."""

    v: Literal[1, 2, 3] = WIRE_VERSION
    rid: str = Field(pattern=_RID_PATTERN)
    prompt: str | list[int] = ""
    messages: list[dict[str, Any]] | None = None
    """v2: a chat; the worker applies the model's chat template (`prompt` stays empty)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Generation options by MII's names; the worker validates them with `GenerateParams`."""
    timeout_s: float | None = Field(None, gt=0)
    """Deadline, counted from the entry's id (the Redis server's clock when it was added)."""
    resume: bool = False
    """Handed back by a draining worker: tokens may already be published, continue them."""
    client: str = ""
    """`<hostname>:<pid>` of the submitting process, for operators."""
    job: str | None = Field(None, pattern=_JOB_PATTERN)
    """v2: the bulk job this request is a line of; the worker records the line's result
    in the job when the request ends (`mii.broker_config.jobs`)."""
    line: int | None = Field(None, ge=0)
    """v2: the line's number in the job's input."""
    reply: str | None = Field(None, pattern=REPLY_PATTERN)
    """v3: the reply stream (`DeploymentKeys.replies(reply)`) the client reads, shared
    with its other requests; None: the request's own response stream."""
    since_ms: int | None = Field(None, ge=0)
    """v3: set on a handed-back request: when its first entry was queued (the Redis
    clock, ms), so that its successor reads what was published since."""

    @model_validator(mode="before")
    @classmethod
    def _version(cls, data: Any) -> Any:
        """A message built here carries the version it is written with."""
        if isinstance(data, dict) and "v" not in data:
            data = {**data, "v": _request_version(data)}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> RequestMessage:
        if self.messages is not None and self.prompt != "":
            raise ValueError("a request has a prompt or messages, not both")
        if (self.job is None) != (self.line is None):
            raise ValueError("job and line go together")
        return self

    def wire_version(self) -> int:
        """The lowest version that can carry this message."""
        return _request_version(self.__dict__)


def _request_version(data: dict) -> int:
    if data.get("reply") is not None or data.get("since_ms") is not None:
        return 3
    return 2 if data.get("messages") is not None or data.get("job") is not None else 1


class ErrorKind(str, Enum):
    """Why a request failed, so that clients raise the matching exception."""

    INVALID_REQUEST = "invalid_request"  # bad options, prompt too long, undecodable entry
    DEADLETTER = "deadletter"  # delivered too often (it kept killing workers)
    GENERATION = "generation"  # the worker failed while serving it


class ResponseChunk(_Message):
    """Tokens of one engine step for one request; the last chunk has `reason` set."""

    v: Literal[1, 2] = WIRE_VERSION
    i: int = Field(0, ge=0)
    """Index of `ids[0]` among the request's generated tokens (replays drop duplicates)."""
    ids: list[int] = Field(default_factory=list)
    text: str = ""
    """Newly releasable text (held-back bytes of a character or of a stop string come later)."""
    lp: list[float] | None = None
    """Log-probability of each token in `ids`, when asked for."""
    toks: list[str] | None = None
    """v2: the text of each token in `ids` decoded alone, when logprobs are asked for (a
    client without the tokenizer, such as the HTTP gateway, shows them)."""
    top: list[list[tuple[int, float, str]]] | None = None
    """v2: for each token in `ids`, the most likely alternatives as (token id, logprob,
    text), when `logprobs` > 0."""
    plen: int = Field(0, ge=0)
    """Prompt length in tokens."""
    glen: int = Field(0, ge=0)
    """Generated tokens so far, these included."""
    reason: GenerationFinishReason | None = None
    error: str | None = None
    etype: ErrorKind | None = None
    worker: str = ""
    """Consumer name of the worker that wrote this chunk."""

    @property
    def final(self) -> bool:
        return self.reason is not None


class ControlMessage(_Message):
    """A broadcast to every worker of the deployment."""

    op: Literal["cancel", "terminate"]
    rid: str | None = Field(None, pattern=_RID_PATTERN)


def pack(fields: dict[str, Any]) -> bytes:
    return msgpack.packb(fields, use_bin_type=True)


def unpack(model: type[_Message], payload: bytes | None) -> Any:
    """Decode and validate one payload; `WireError` says what is wrong with it."""
    if payload is None:
        raise WireError("entry has no 'm' field")
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"payload is not msgpack: {exc}") from None
    if not isinstance(data, dict):
        raise WireError(f"payload is a {type(data).__name__}, not a map")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        raise WireError(f"invalid {model.__name__}: {problems}") from None


def request_fields(msg: RequestMessage) -> dict[bytes, bytes]:
    """XADD fields of a request entry."""
    data = msg.model_dump(exclude_defaults=True)
    data["v"] = msg.wire_version()
    return {RID: msg.rid.encode(), PAYLOAD: pack(data)}


def chunk_fields(**fields: Any) -> dict[str, Any]:
    """A response chunk as a plain map, built without a pydantic pass (this is the worker's
    hot path); tests check that it decodes as a valid `ResponseChunk`."""
    v2 = fields.get("toks") is not None or fields.get("top") is not None
    fields["v"] = CHUNK_WIRE_VERSION if v2 else WIRE_VERSION
    reason = fields.get("reason")
    if reason is not None:
        fields["reason"] = GenerationFinishReason(reason).value
    if fields.get("etype") is not None:
        fields["etype"] = ErrorKind(fields["etype"]).value
    return fields


def chunk_payload(**fields: Any) -> bytes:
    """A response stream's entry payload: one chunk (`chunk_fields`)."""
    return pack(chunk_fields(**fields))


def reply_payload(chunks: dict[str, dict[str, Any]]) -> bytes:
    """A reply stream's entry payload: request id -> chunk (`chunk_fields`)."""
    return pack({"v": REPLY_WIRE_VERSION, "c": chunks})


def decode_request(fields: dict[bytes, bytes]) -> RequestMessage:
    return unpack(RequestMessage, fields.get(PAYLOAD))


def decode_chunk(fields: dict[bytes, bytes]) -> ResponseChunk:
    return unpack(ResponseChunk, fields.get(PAYLOAD))


class ReplyEntry(_Message):
    """One entry of a reply stream: the chunks of several requests."""

    c: dict[str, dict[str, Any]]


def decode_reply(fields: dict[bytes, bytes]) -> list[tuple[str, ResponseChunk]]:
    """(request id, chunk) of each request in a reply stream's entry."""
    entry = unpack(ReplyEntry, fields.get(PAYLOAD))
    try:
        return [(rid, ResponseChunk.model_validate(chunk)) for rid, chunk in entry.c.items()]
    except ValidationError as exc:
        raise WireError(f"invalid chunk in a reply entry: {exc.errors()[0]['msg']}") from None


def control_fields(msg: ControlMessage) -> dict[bytes, bytes]:
    return {PAYLOAD: pack(msg.model_dump(exclude_none=True))}  # `v` has no None default


def decode_control(fields: dict[bytes, bytes]) -> ControlMessage:
    return unpack(ControlMessage, fields.get(PAYLOAD))
