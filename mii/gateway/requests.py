"""Reading OpenAI's `/v1/completions` and `/v1/chat/completions` bodies into one
`GenerationRequest`: what to generate, how many choices, how to answer, and MII's
generation options (`mii.producer.openai_params` translates those)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mii.gateway.errors import bad_request
from mii.producer.openai_params import CHAT, COMPLETIONS, mii_options
from mii.producer.submit import MAX_CHOICES, Chat, Prompt

_ROLES = {"system", "user", "assistant", "tool", "developer"}


@dataclass(frozen=True)
class GenerationRequest:
    endpoint: str
    """`COMPLETIONS` or `CHAT`."""
    prompts: list[Prompt]
    """Texts or token ids (completions), or one `Chat`."""
    options: dict[str, Any]
    """MII's generation options."""
    model: str | None = None
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    """`stream_options.include_usage`: a last chunk with the usage."""
    echo: bool = False
    """Completions: the prompt text before each choice's text."""

    @property
    def chat(self) -> bool:
        return self.endpoint == CHAT

    @property
    def top_logprobs(self) -> int | None:
        """How many alternatives each token shows; None when logprobs were not asked for."""
        return self.options.get("logprobs")


def json_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    return body


def parse_completion(body: dict[str, Any]) -> GenerationRequest:
    prompts = _prompts(body.get("prompt"))
    echo = _flag(body, "echo")
    if echo and not all(isinstance(p, str) for p in prompts):
        raise bad_request("echo needs text prompts (a gateway has no tokenizer)", "echo")
    return _request(COMPLETIONS, body, prompts, echo=echo)


def parse_chat(body: dict[str, Any]) -> GenerationRequest:
    return _request(CHAT, body, [Chat(_messages(body.get("messages")))])


def _request(endpoint: str, body: dict, prompts: list[Prompt], **extra) -> GenerationRequest:
    return GenerationRequest(
        endpoint=endpoint,
        prompts=prompts,
        options=mii_options(body, endpoint),
        model=_model(body.get("model")),
        n=_n(body.get("n")),
        stream=_flag(body, "stream"),
        include_usage=_include_usage(body.get("stream_options")),
        **extra,
    )


def _model(value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise bad_request("model must be a string", "model")
    return value


def _n(value) -> int:
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CHOICES:
        raise bad_request(f"n must be an integer from 1 to {MAX_CHOICES}", "n")
    return value


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false", name)
    return bool(value)


def _include_usage(options) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request('stream_options is {"include_usage": bool}', "stream_options")
    return options.get("include_usage", False)


def _prompts(prompt) -> list[Prompt]:
    """A text, token ids, or a list of either."""
    if isinstance(prompt, str) and prompt:
        return [prompt]
    if _token_ids(prompt):
        return [prompt]
    listed = isinstance(prompt, list) and bool(prompt)
    texts = listed and all(isinstance(p, str) and p for p in prompt)
    if listed and (texts or all(_token_ids(p) for p in prompt)):
        return list(prompt)
    raise bad_request("prompt is a non-empty string, token ids, or a list of either", "prompt")


def _token_ids(value) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _messages(messages) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list", "messages")
    return [_message(m) for m in messages]


def _message(message) -> dict[str, Any]:
    """A message as the chat template takes it: a role and a text content."""
    if not isinstance(message, dict) or message.get("role") not in _ROLES:
        raise bad_request(f"each message needs a role of {sorted(_ROLES)}", "messages")
    role = "system" if message["role"] == "developer" else message["role"]
    return {**message, "role": role, "content": _text(message.get("content"))}


def _text(content) -> str:
    """A string, or the text parts of a list of content parts, joined."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list) and all(_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    raise bad_request("message content is a string or a list of text parts", "messages")


def _text_part(part) -> bool:
    return (
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
    )
