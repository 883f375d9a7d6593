"""`Response`: what `pipe(...)` and `client.generate(...)` return, one per prompt (MII's shape)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from mii.constants import GenerationFinishReason


@dataclass
class Response:
    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: GenerationFinishReason
    token_ids: list[int] = field(default_factory=list)
    """The generated token ids (an extension of MII's Response)."""
    logprobs: list[float] | None = None
    """Log-probability of each generated token, when `logprobs=` was asked for."""
    tokens: list[str] | None = None
    """Text of each generated token decoded alone, when `logprobs=` was asked for (from a
    deployment; the in-process pipeline leaves it None)."""
    top_logprobs: list[list[tuple[int, float, str]]] | None = None
    """For each generated token, its best alternatives as (token id, logprob, text), when
    `logprobs=` > 0 was asked for (from a deployment)."""

    def to_msg_dict(self) -> dict:
        msg = asdict(self)
        msg["finish_reason"] = GenerationFinishReason(self.finish_reason).value
        return msg

    @staticmethod
    def from_msg_dict(msg: dict) -> Response:
        fields = dict(msg)
        fields["finish_reason"] = GenerationFinishReason(fields["finish_reason"])
        return Response(**fields)

    def __repr__(self) -> str:
        return self.generated_text

    def __str__(self) -> str:
        return self.generated_text


@dataclass
class ResponseParts:
    """What one request accumulates until it finishes: the in-process pipeline and the
    queue's client both build their `Response`s from it."""

    prompt: Any
    return_full_text: bool = False
    want_logprobs: bool = False
    prompt_length: int = 0
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float, str]]] = field(default_factory=list)
    finish_reason: GenerationFinishReason | None = None

    def add(
        self,
        token_ids: list[int],
        text: str,
        logprobs: list[float] | None = None,
        tokens: list[str] | None = None,
        top: list | None = None,
    ) -> None:
        self.token_ids += token_ids
        self.text.append(text)
        if logprobs:
            self.logprobs += logprobs
        if tokens:
            self.tokens += tokens
        if top:
            self.top_logprobs += [[tuple(alt) for alt in alts] for alts in top]

    def delta(self, token_ids: list[int], text: str) -> Response:
        """A streamed piece: its own tokens, text and logprobs, the totals so far."""
        n = len(token_ids)
        return Response(
            generated_text=text,
            prompt_length=self.prompt_length,
            generated_length=len(self.token_ids),
            finish_reason=self.finish_reason or GenerationFinishReason.NONE,
            token_ids=list(token_ids),
            logprobs=self._last(self.logprobs, n),
            tokens=self._last(self.tokens, n),
            top_logprobs=self._last(self.top_logprobs, n),
        )

    def _last(self, values: list, n: int) -> list | None:
        if not self.want_logprobs or not values:
            return None
        return values[len(values) - n :] if n else []

    def response(self) -> Response:
        text = "".join(self.text)
        if self.return_full_text and isinstance(self.prompt, str):
            text = self.prompt + text
        return Response(
            generated_text=text,
            prompt_length=self.prompt_length,
            generated_length=len(self.token_ids),
            finish_reason=self.finish_reason or GenerationFinishReason.NONE,
            token_ids=self.token_ids,
            logprobs=self.logprobs if self.want_logprobs else None,
            tokens=(self.tokens or None) if self.want_logprobs else None,
            top_logprobs=(self.top_logprobs or None) if self.want_logprobs else None,
        )
