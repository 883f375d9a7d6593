"""`Response`: what `pipe(...)` and `client.generate(...)` return, one per prompt (MII's shape)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

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
