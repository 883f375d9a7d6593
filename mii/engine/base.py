"""`Engine`: what a host of the engine (the worker loop, `mii.pipeline`) relies on.

`LLMEngine` is the implementation; the worker's tests and the broker benchmark use a fast
fake with the same methods. Nothing here imports torch, so the worker's contract with its
engine is readable (and checkable) without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from mii.engine.outputs import RequestOutput
from mii.engine.sampling_params import SamplingParams


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


class Engine(Protocol):
    tokenizer: Any
    """The model's tokenizer (a Hugging Face one, or any with `encode`); None when the
    engine runs on token ids only."""
    max_model_len: int
    """The longest prompt + generation a request may have."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        generated_token_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request; `generated_token_ids` resumes one another worker began.
        Raises `InvalidRequestError` for a request the engine cannot take."""

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False when it is not here."""

    def step(self) -> list[RequestOutput]:
        """One forward pass: the new tokens of every request that produced one."""

    def has_unfinished_requests(self) -> bool: ...

    def can_admit(self, num_prompt_tokens: int) -> bool:
        """Whether a new prompt of this length fits beside the work already queued."""

    def stats(self) -> Any:
        """A dataclass of counters (KV blocks, running and waiting requests, tokens)."""

    def close(self) -> None:
        """Release devices and helper processes."""
