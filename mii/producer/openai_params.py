"""OpenAI's request options as MII's generation options: the one translation behind the HTTP
gateway's `/v1/completions` and `/v1/chat/completions` and the OpenAI batch lines of bulk
jobs (`mii.producer.bulk.input`).

OpenAI samples at temperature 1 and top_p 1 unless told; `temperature: 0` means greedy.
vLLM's extensions keep vLLM's names (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`,
`ignore_eos`, `stop_token_ids`). An option that is None counts as not given (some SDKs send
nulls). A bad option raises `OpenAIParamError` naming it as the caller wrote it.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from mii.errors import InvalidRequestError
from mii.params import MAX_LOGPROBS, GenerateParams

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MAX_TEMPERATURE = 2.0

# OpenAI (or vLLM) name -> MII name, for options whose values carry over unchanged.
_RENAMED = {
    "max_tokens": "max_new_tokens",
    "max_completion_tokens": "max_new_tokens",
    "min_tokens": "min_new_tokens",
    "top_p": "top_p",
    "stop": "stop",
    "seed": "seed",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "stop_token_ids": "stop_token_ids",
}
_CALLER = {"model", "prompt", "messages", "stream", "stream_options", "n"}
"""Options the caller handles (what to generate, how many, how to answer)."""
_NO_EFFECT = {"user", "store", "metadata", "service_tier", "parallel_tool_calls"}
"""Accepted without effect, as OpenAI accepts them."""
_COMMON = (set(_RENAMED) - {"max_completion_tokens"}) | {"temperature", "logprobs"}
_ONLY = {COMPLETIONS: {"echo"}, CHAT: {"top_logprobs", "max_completion_tokens"}}


class OpenAIParamError(InvalidRequestError):
    """An OpenAI request option that is unknown, unsupported or out of range."""

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


def known_options(endpoint: str) -> set[str]:
    return _COMMON | _CALLER | _NO_EFFECT | _ONLY[endpoint]


def mii_options(body: dict[str, Any], endpoint: str) -> dict[str, Any]:
    """MII's generation options for an OpenAI request body; validated, so a bad value
    fails here by its OpenAI name."""
    given = {k: v for k, v in body.items() if v is not None}
    unknown = sorted(set(given) - known_options(endpoint))
    if unknown:
        raise OpenAIParamError(f"unrecognized request argument: {unknown[0]}", unknown[0])
    options = {_RENAMED[k]: v for k, v in given.items() if k in _RENAMED}  # echo: the caller's
    options.update(_sampling(given.get("temperature", 1.0)))
    if "top_p" not in options and options["do_sample"]:
        options["top_p"] = 1.0
    logprobs = _logprobs(given, endpoint)
    if logprobs is not None:
        options["logprobs"] = logprobs
    validate(options)
    return options


def _sampling(temperature) -> dict[str, Any]:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise OpenAIParamError("temperature must be a number", "temperature")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise OpenAIParamError(
            f"temperature must be in [0, {MAX_TEMPERATURE}], got {temperature}", "temperature"
        )
    if temperature == 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": float(temperature)}


def _logprobs(given: dict[str, Any], endpoint: str) -> int | None:
    """Completions: `logprobs` is how many alternatives; chat: a bool and `top_logprobs`."""
    value = given.get("logprobs")
    if endpoint == CHAT:
        top = given.get("top_logprobs")
        if top is not None and value is not True:
            raise OpenAIParamError("top_logprobs needs logprobs: true", "top_logprobs")
        if value is not None and not isinstance(value, bool):
            raise OpenAIParamError("logprobs is true or false here", "logprobs")
        return _count(top or 0, "top_logprobs") if value else None
    return None if value is None or value is False else _count(value, "logprobs")


def _count(value, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS:
        raise OpenAIParamError(f"{param} must be an integer from 0 to {MAX_LOGPROBS}", param)
    return value


def validate(options: dict[str, Any]) -> GenerateParams:
    """`GenerateParams` of MII options; an error names the OpenAI option at fault."""
    try:
        return GenerateParams(**options)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = str(err["loc"][0]) if err["loc"] else None
        param = _openai_name(field)
        raise OpenAIParamError(f"{param or 'request'}: {err['msg']}", param) from None


def _openai_name(field: str | None) -> str | None:
    names = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
    if field in names:
        return names[field]
    return field
