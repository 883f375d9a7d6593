"""LLMEngine: continuous batching over a paged KV cache; one `step()` is one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mii.engine.config import EngineConfig
from mii.engine.outputs import RequestOutput
from mii.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    tokens_generated: int
    """Tokens generated since the engine started."""
    prompt_tokens_processed: int
    steps: int


class LLMEngine:
    """Interface (implementation in progress)."""

    def __init__(self, config: EngineConfig) -> None:
        raise NotImplementedError

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: Sequence[int],
        params: SamplingParams,
        generated_token_ids: Sequence[int] = (),
    ) -> None:
        """Queue a request. `generated_token_ids` resumes one that another worker began."""
        raise NotImplementedError

    def abort_request(self, request_id: str) -> bool:
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        raise NotImplementedError

    def has_unfinished_requests(self) -> bool:
        raise NotImplementedError

    def can_admit(self, num_prompt_tokens: int) -> bool:
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError
