"""A bulk job's output lines: mii's form, or OpenAI's batch output form for lines that
came in OpenAI's batch form (and for every line of a job whose input was in that form).

mii's form, one object a line, in input order:
    {"id", "line", "text", "prompt_tokens", "generated_tokens", "finish_reason"[, "error"]}

OpenAI's form (https://platform.openai.com/docs/guides/batch):
    {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null,
     "error": {"code", "message"} | null}
with a `text_completion` or `chat.completion` body (choices, usage, and each choice's
`logprobs` when the line asked for them), or an error body.

Each line is written in the form of its input line: a job that mixes both forms writes
both (tell them apart by `custom_id`); a job whose valid lines are all OpenAI lines writes
OpenAI's form throughout.
"""

from __future__ import annotations

from typing import Any

from mii.broker_config.jobs import LineInfo, LineResult
from mii.broker_config.wire import ErrorKind
from mii.constants import GenerationFinishReason as Reason
from mii.producer.bulk.input import CHAT
from mii.producer.openai_logprobs import chat_logprobs, completion_logprobs
from mii.response import Response

# Lines ended before they could finish: OpenAI reports them as errors of the batch.
_UNFINISHED = {
    Reason.CANCELLED: ("batch_cancelled", "the job was cancelled before this line finished"),
    Reason.TIMEOUT: ("request_timeout", "the line's deadline passed"),
}


def output_record(
    line: int, rid: str, info: LineInfo, result: LineResult, openai: bool, model: str
) -> dict[str, Any]:
    """The output object of one finished line."""
    if openai or info.url is not None:
        return _openai_record(rid, info, result, model)
    record: dict[str, Any] = {
        "id": info.id,
        "line": line,
        "text": result.text,
        "prompt_tokens": result.plen,
        "generated_tokens": result.glen,
        "finish_reason": result.reason.value,
    }
    if result.error is not None:
        record["error"] = result.error
    return record


def _openai_record(rid: str, info: LineInfo, result: LineResult, model: str) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"batch_req_{rid}", "custom_id": info.id}
    if result.reason in _UNFINISHED:
        code, message = _UNFINISHED[result.reason]
        return record | {"response": None, "error": {"code": code, "message": message}}
    if result.error is not None:
        status, body = _error_body(result)
    else:
        status, body = 200, _success_body(rid, info, result, model)
    response = {"status_code": status, "request_id": rid, "body": body}
    return record | {"response": response, "error": None}


def _error_body(result: LineResult) -> tuple[int, dict]:
    invalid = result.etype in (None, ErrorKind.INVALID_REQUEST)
    kind = "invalid_request_error" if invalid else "server_error"
    error = {"message": result.error, "type": kind, "param": None, "code": None}
    return (400 if invalid else 500), {"error": error}


def _success_body(rid: str, info: LineInfo, result: LineResult, model: str) -> dict:
    reason = result.reason.value if result.reason in (Reason.STOP, Reason.LENGTH) else "stop"
    usage = {
        "prompt_tokens": result.plen,
        "completion_tokens": result.glen,
        "total_tokens": result.plen + result.glen,
    }
    common = {"created": int(result.t), "model": model, "usage": usage}
    logprobs = _logprobs(info, result)
    if info.url == CHAT:
        message = {"role": "assistant", "content": result.text}
        choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason}
        return {"id": f"chatcmpl-{rid}", "object": "chat.completion", "choices": [choice]} | common
    choice = {"index": 0, "text": result.text, "logprobs": logprobs, "finish_reason": reason}
    return {"id": f"cmpl-{rid}", "object": "text_completion", "choices": [choice]} | common


def _logprobs(info: LineInfo, result: LineResult) -> dict | None:
    """OpenAI's logprobs of the choice: when the line asked and its worker recorded them."""
    if info.logprobs is None or result.lp is None:
        return None
    response = Response(
        generated_text=result.text, prompt_length=result.plen, generated_length=result.glen,
        finish_reason=result.reason, token_ids=list(result.ids or []), logprobs=result.lp,
        tokens=result.toks, top_logprobs=result.top,
    )  # fmt: skip
    if info.url == CHAT:
        return chat_logprobs(response, info.logprobs)
    return completion_logprobs(response, info.logprobs)
