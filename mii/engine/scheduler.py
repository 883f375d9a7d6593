"""Dynamic SplitFuse scheduling over plain `Sequence` objects.

Every step fills a token budget: first one token for each running decode, then chunks of
prompts (a long prompt continues over several steps; several short ones share a step).
When the cache runs out of blocks, the most recently admitted request is preempted and
later recomputed from its tokens. The prefill-first policy (vLLM's classic schedule) runs
waiting prompts before any decode and exists to compare against.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from mii.engine.block_manager import BlockManager
from mii.engine.config import SchedulePolicy, SchedulerConfig
from mii.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    """Tokens `start:start + num_tokens` of `seq` run in this step."""

    seq: Sequence
    start: int
    num_tokens: int
    samples: bool
    """The chunk reaches the sequence's last token, so the step samples a new one."""

    @classmethod
    def next_of(cls, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return cls(seq, start, num_tokens, start + num_tokens == seq.num_tokens)

    @property
    def end(self) -> int:
        return self.start + self.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        block_manager: BlockManager,
        recompute_at: int | None = None,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.recompute_at = recompute_at
        """LongRoPE (Phi-3): a sequence growing to `recompute_at + 1` tokens computes its
        cache again from the start, every position now with the long factors, as
        transformers' generate does (see layers/rotary.py)."""
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        if self.recompute_at is not None:
            self._restart_crossing()
        if self.config.policy == SchedulePolicy.PREFILL_FIRST:
            budget = self._schedule_running(out, budget, decodes=False)
            budget = self._schedule_waiting(out, budget)
            if not out.chunks:
                self._schedule_running(out, budget, decodes=True)
            return out
        budget = self._schedule_running(out, budget, decodes=True)
        budget = self._schedule_running(out, budget, decodes=False)
        self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int, decodes: bool) -> int:
        for seq in [s for s in self.running if s.is_decoding == decodes]:
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted earlier in this pass
            n = min(seq.num_uncomputed, budget)
            if self._make_room(seq, n, out):
                out.chunks.append(ScheduledChunk.next_of(seq, n))
                budget -= n
        return budget

    def _restart_crossing(self) -> None:
        """Drop the cache of sequences that just grew past `recompute_at` tokens (their
        first token past it is the only one left to compute), so it is computed again."""
        at = self.recompute_at
        for seq in self.running:
            if seq.num_computed_tokens == at and seq.num_tokens == at + 1:
                self.block_manager.free(seq)

    def _make_room(self, seq: Sequence, n: int, out: SchedulerOutput) -> bool:
        """Allocate blocks for `seq`, preempting the newest other requests as needed."""
        if not self.block_manager.can_allocate(seq, n):
            scheduled = {id(c.seq) for c in out.chunks}
            while not self.block_manager.can_allocate(seq, n):
                victims = [s for s in self.running if s is not seq and id(s) not in scheduled]
                if not victims:
                    self._preempt(seq, out)
                    return False
                self._preempt(max(victims, key=lambda s: s.arrival), out)
        self.block_manager.allocate(seq, n)
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq in out.preempted:
                break  # it just lost its blocks; admitting it again now would thrash
            self.block_manager.reuse_cached_prefix(seq)
            n = min(seq.num_uncomputed, budget, self._tokens_that_fit(seq))
            if n <= 0:
                self.block_manager.free(seq)
                break
            self.block_manager.allocate(seq, n)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk.next_of(seq, n))
            budget -= n
        return budget

    def _tokens_that_fit(self, seq: Sequence) -> int:
        """How many more tokens of `seq` the free blocks (and its own) can hold."""
        bm = self.block_manager
        capacity = (len(seq.block_table) + bm.num_free_blocks) * bm.block_size
        return capacity - seq.num_computed_tokens

    def finish_step(self, out: SchedulerOutput) -> None:
        """Advance each scheduled sequence past the tokens this step computed."""
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
            self.block_manager.seal_computed_blocks(chunk.seq)
            self.block_manager.release_out_of_window(chunk.seq)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
