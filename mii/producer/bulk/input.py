"""Reading a bulk job's input: JSONL, one request a line, in mii's form or OpenAI's batch form.

mii's form: `{"prompt": "..." | [ids], "id": optional, "params": {MII options}}`, or
`"messages": [...]` instead of `prompt` for a chat (the worker applies the model's chat
template). OpenAI's batch form: `{"custom_id": ..., "method": "POST", "url":
"/v1/completions" | "/v1/chat/completions", "body": {...}}`, whose body options map onto
MII's (`max_tokens` -> `max_new_tokens`, `temperature: 0` -> greedy, ...).

A line that cannot be read becomes a `LineError` and the rest of the job goes on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mii.errors import InvalidRequestError
from mii.params import GenerateParams, check_prompt, check_text
from mii.producer.openai_params import CHAT, COMPLETIONS, mii_options


@dataclass(frozen=True)
class BulkLine:
    """One valid input line: what to generate and with which options."""

    line: int
    id: str
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    params: dict[str, Any] = field(default_factory=dict)
    openai_url: str | None = None
    """The OpenAI endpoint the line came for (its output is written in OpenAI's form)."""


@dataclass(frozen=True)
class LineError:
    line: int
    id: str | None
    error: str


def read_lines(lines: Iterable[str]) -> Iterator[BulkLine | LineError]:
    """Parse every non-blank line; line numbers count from 0 over all lines."""
    for number, text in enumerate(lines):
        if text.strip():
            yield parse_line(number, text)


def parse_line(number: int, text: str) -> BulkLine | LineError:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineError(number, None, f"not JSON: {exc.msg} at column {exc.colno}")
    if not isinstance(data, dict):
        return LineError(number, None, f"a line is a JSON object, not {type(data).__name__}")
    ident = data.get("custom_id", data.get("id"))
    ident = str(ident) if ident is not None else str(number)
    try:
        check_text(ident, "the line's id")
    except InvalidRequestError as exc:
        return LineError(number, None, str(exc))
    try:
        if "url" in data or "body" in data:
            return _openai_line(number, ident, data)
        return _mii_line(number, ident, data)
    except InvalidRequestError as exc:
        return LineError(number, ident, str(exc))


def _mii_line(number: int, ident: str, data: dict[str, Any]) -> BulkLine:
    unknown = sorted(set(data) - {"id", "prompt", "messages", "params"})
    if unknown:
        raise InvalidRequestError(f"unknown field(s) {', '.join(unknown)}")
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidRequestError("params must be an object")
    GenerateParams.from_kwargs(**params)  # a bad option fails this line now, by name
    prompt, messages = _prompt_or_messages(data.get("prompt"), data.get("messages"))
    return BulkLine(number, ident, prompt, messages, params)


def _openai_line(number: int, ident: str, data: dict[str, Any]) -> BulkLine:
    url, body = data.get("url"), data.get("body")
    if url not in (COMPLETIONS, CHAT):
        raise InvalidRequestError(f"url {url!r} is not {COMPLETIONS} or {CHAT}")
    if data.get("method", "POST") != "POST" or not isinstance(body, dict):
        raise InvalidRequestError("an OpenAI batch line is a POST with an object body")
    params = _openai_params(body, url)
    if url == CHAT:
        prompt, messages = _prompt_or_messages(None, body.get("messages"))
    else:
        prompt, messages = _prompt_or_messages(body.get("prompt"), None)
    return BulkLine(number, ident, prompt, messages, params, openai_url=url)


def _openai_params(body: dict[str, Any], url: str) -> dict[str, Any]:
    """The line's options (explicit either way: they win over a job's defaults)."""
    if body.get("n", 1) != 1:
        raise InvalidRequestError("n > 1 is not supported; submit the line n times")
    if body.get("echo"):
        raise InvalidRequestError("echo is not supported in bulk jobs")
    return mii_options(body, url)


def _prompt_or_messages(prompt, messages):
    if (prompt is None) == (messages is None):
        raise InvalidRequestError("a line needs exactly one of prompt or messages")
    if prompt is not None:
        return check_prompt(prompt), None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidRequestError("each message is an object with a role and a content")
        check_text(json.dumps(m, ensure_ascii=False), "a message")
    return None, messages
