"""A request inside the engine: its tokens, how far its KV cache is computed, its blocks."""

from __future__ import annotations

from collections.abc import Sequence as SequenceType
from enum import Enum

from mii.constants import GenerationFinishReason
from mii.engine.sampling_params import SamplingParams

PENDING = -1
"""Stands for a token that a step still running on the device has sampled."""


class SequenceStatus(str, Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Plain bookkeeping, no tensors: the scheduler and block manager work on these.

    `token_ids` holds the prompt and then every generated token. `num_computed_tokens`
    counts the leading tokens whose keys and values are in the cache; the rest must still
    run through the model (a prompt's chunks, the last sampled token, or all of it again
    after a preemption).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: SequenceType[int],
        params: SamplingParams,
        arrival: int,
        generated_token_ids: SequenceType[int] = (),
        seed: int = 0,
    ) -> None:
        self.request_id = request_id
        self.params = params
        self.arrival = arrival
        self.seed = seed
        self.token_ids: list[int] = [*prompt_token_ids, *generated_token_ids]
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_resumed_tokens = len(generated_token_ids)
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.num_released_blocks = 0
        """Leading blocks given back once they left the sliding window (their table entries
        stay for the positions; attention never reads them)."""
        self.num_hashed_blocks = 0
        self.last_block_hash: int | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: GenerationFinishReason | None = None
        self.num_pending = 0
        """Trailing tokens sampled by a step still running (PENDING until it is read)."""

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """One token to run: the step after it samples the next token."""
        return self.num_uncomputed == 1 and self.num_computed_tokens > 0

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def append_pending(self) -> int:
        """Stand in for a token a running step samples; returns its index."""
        self.token_ids.append(PENDING)
        self.num_pending += 1
        return len(self.token_ids) - 1

    def resolve(self, index: int, token_id: int) -> None:
        self.token_ids[index] = token_id
        self.num_pending -= 1

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending
