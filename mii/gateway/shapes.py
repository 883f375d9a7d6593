"""OpenAI's response bodies, whole and streamed, for completions and chat completions.

One `Shape` per endpoint says how a choice looks; both build the same envelope
(`id`, `object`, `created`, `model`, `choices`, `usage`). Usage counts each prompt once
(whatever `n`) and every generated token of every choice.
"""

from __future__ import annotations

import time
import uuid

from mii.constants import GenerationFinishReason as Reason
from mii.gateway.errors import APIError
from mii.gateway.requests import GenerationRequest
from mii.producer.openai_logprobs import chat_logprobs, completion_logprobs
from mii.response import Response

_FINISHED = {Reason.STOP: "stop", Reason.LENGTH: "length"}


def finish_reason(response: Response) -> str | None:
    """OpenAI's finish reason; a request that timed out or was cancelled is an error."""
    reason = Reason(response.finish_reason)
    if reason == Reason.NONE:
        return None
    if reason == Reason.TIMEOUT:
        raise APIError(504, "the request's deadline passed", "timeout_error",
                       code="request_timeout")  # fmt: skip
    if reason in _FINISHED:
        return _FINISHED[reason]
    raise APIError(503, f"the request ended early: {reason.value}", "service_unavailable")


def usage(prompt_tokens: list[int], completion_tokens: int) -> dict:
    prompt = sum(prompt_tokens)
    return {"prompt_tokens": prompt, "completion_tokens": completion_tokens,
            "total_tokens": prompt + completion_tokens}  # fmt: skip


class Shape:
    """What an endpoint's answers look like; `request` is the one being answered."""

    object = chunk_object = id_prefix = ""

    def __init__(self, request: GenerationRequest, model: str) -> None:
        self.request, self.model = request, model
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def body(self, responses: list[Response]) -> dict:
        """The whole answer: `n` choices per prompt, in order, and the usage."""
        choices = [self.choice(i, r) for i, r in enumerate(responses)]
        n = self.request.n
        prompts = [r.prompt_length for r in responses[::n]]
        completion = sum(r.generated_length for r in responses)
        return self.envelope(self.object, choices) | {"usage": usage(prompts, completion)}

    def chunk(self, choices: list[dict]) -> dict:
        chunk = self.envelope(self.chunk_object, choices)
        return chunk | {"usage": None} if self.request.include_usage else chunk

    def usage_chunk(self, usage_: dict) -> dict:
        return self.envelope(self.chunk_object, []) | {"usage": usage_}

    def choice(self, index: int, response: Response) -> dict:
        raise NotImplementedError

    def delta_choice(self, index: int, delta: Response, first: bool) -> dict:
        """A streamed piece of choice `index`; `first`: its first piece."""
        raise NotImplementedError


class CompletionShape(Shape):
    object, chunk_object, id_prefix = "text_completion", "text_completion", "cmpl"

    def __init__(self, request: GenerationRequest, model: str) -> None:
        super().__init__(request, model)
        self._sent: dict[int, int] = {}  # choice -> characters streamed (text offsets)

    def prompt_text(self, index: int) -> str:
        """The echoed prompt of choice `index` ("" without echo)."""
        return self.request.prompts[index // self.request.n] if self.request.echo else ""

    def choice(self, index: int, response: Response) -> dict:
        echo = self.prompt_text(index)
        return self._choice(index, echo + response.generated_text, response, len(echo))

    def delta_choice(self, index: int, delta: Response, first: bool) -> dict:
        echo = self.prompt_text(index) if first else ""
        offset = self._sent.get(index, 0) + len(echo)
        self._sent[index] = offset + len(delta.generated_text)
        return self._choice(index, echo + delta.generated_text, delta, offset)

    def _choice(self, index: int, text: str, response: Response, offset: int) -> dict:
        k = self.request.top_logprobs
        logprobs = None if k is None else completion_logprobs(response, k, offset)
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(response)}  # fmt: skip


class ChatShape(Shape):
    object, chunk_object, id_prefix = "chat.completion", "chat.completion.chunk", "chatcmpl"

    def choice(self, index: int, response: Response) -> dict:
        message = {"role": "assistant", "content": response.generated_text}
        return {"index": index, "message": message, "logprobs": self._logprobs(response),
                "finish_reason": finish_reason(response)}  # fmt: skip

    def delta_choice(self, index: int, delta: Response, first: bool) -> dict:
        message = {"role": "assistant"} if first else {}
        message["content"] = delta.generated_text
        return {"index": index, "delta": message, "logprobs": self._logprobs(delta),
                "finish_reason": finish_reason(delta)}  # fmt: skip

    def _logprobs(self, response: Response) -> dict | None:
        k = self.request.top_logprobs
        return None if k is None else chat_logprobs(response, k)


def shape_for(request: GenerationRequest, model: str) -> Shape:
    return ChatShape(request, model) if request.chat else CompletionShape(request, model)
