"""What `LLMEngine.step()` returns: per request, the tokens and text that step produced."""

from __future__ import annotations

from dataclasses import dataclass

from mii.constants import GenerationFinishReason


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob) of the best alternatives


@dataclass(frozen=True)
class RequestOutput:
    """One request's progress in one engine step.

    `token_ids` are the tokens generated this step (usually one); `first_token_index` is the
    index of `token_ids[0]` among all generated tokens of the request, so a consumer can
    drop duplicates after a replay. `text` is the newly *releasable* text: the
    detokenizer holds back bytes of an unfinished UTF-8 character and a tail that may
    still grow into a stop string, and releases them later or drops them at a stop.
    """

    request_id: str
    token_ids: tuple[int, ...]
    text: str
    first_token_index: int
    prompt_length: int
    generated_length: int
    finished: bool = False
    finish_reason: GenerationFinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None
    error: str | None = None
