"""One step's ragged batch as plain integer arrays: what the model runner turns into device
tensors, and what rank 0 of a tensor-parallel group sends to the other ranks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mii.engine.scheduler import ScheduledChunk
from mii.engine.sequence import PENDING

if TYPE_CHECKING:
    from mii.engine.layers.rotary import LongPromptRope

HEADER = 5  # tokens, sequences, block-table width, sampling rows, pending tokens
PACKED_ARRAYS = ("input_ids", "positions", "slot_mapping", "block_tables", "query_start_loc",
                 "seq_lens", "logits_indices", "pending_rows", "pending_sources")  # fmt: skip
"""The arrays `pack` writes after the header, in order."""


_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class StepPlan:
    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slot_mapping: np.ndarray  # (T,) int64, block * block_size + offset
    block_tables: np.ndarray  # (B, max_blocks) int32
    query_start_loc: np.ndarray  # (B + 1,) int32
    seq_lens: np.ndarray  # (B,) int32, context length after this step
    logits_indices: np.ndarray  # (N,) int64, rows of the sequences that sample
    pending_rows: np.ndarray = field(default_factory=lambda: _EMPTY)
    """(P,) int64: rows of `input_ids` that hold a PENDING token ..."""
    pending_sources: np.ndarray = field(default_factory=lambda: _EMPTY)
    """(P,) int64: ... and which sample of the step before each one is."""

    @classmethod
    def build(
        cls,
        chunks: list[ScheduledChunk],
        block_size: int,
        sample_rows: dict[int, int] | None = None,
        long_rope: LongPromptRope | None = None,
    ) -> StepPlan:
        """Flatten the chunks into one ragged batch. Loops run per sequence, not per token.

        `sample_rows` maps `id(seq)` to its row among the samples of the step still running,
        for the sequences whose last token is PENDING (asynchronous scheduling).
        `long_rope`: the model's LongRoPE rule; `positions` then index its rotary table."""
        q_lens = np.array([c.num_tokens for c in chunks], dtype=np.int32)
        query_start = np.zeros(len(chunks) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=query_start[1:])
        positions = np.concatenate([np.arange(c.start, c.end, dtype=np.int64) for c in chunks])
        max_blocks = max(len(c.seq.block_table) for c in chunks)
        tables = np.zeros((len(chunks), max_blocks), dtype=np.int32)
        input_ids: list[int] = []
        for row, c in enumerate(chunks):
            tables[row, : len(c.seq.block_table)] = c.seq.block_table
            input_ids.extend(c.seq.token_ids[c.start : c.end])
        rows = np.repeat(np.arange(len(chunks)), q_lens)
        slots = tables[rows, positions // block_size].astype(np.int64) * block_size
        slots += positions % block_size
        if long_rope is not None:
            positions = _long_rope_rows(chunks, q_lens, positions, long_rope)
        sampling = [i for i, c in enumerate(chunks) if c.samples]
        pending = [
            (int(query_start[i + 1]) - 1, sample_rows[id(c.seq)])
            for i, c in enumerate(chunks)
            if sample_rows and c.seq.token_ids[c.end - 1] == PENDING
        ]
        rows_sources = np.array(pending, dtype=np.int64).reshape(-1, 2)
        return cls(
            input_ids=np.array(input_ids, dtype=np.int64),
            positions=positions,
            slot_mapping=slots,
            block_tables=tables,
            query_start_loc=query_start,
            seq_lens=np.array([c.end for c in chunks], dtype=np.int32),
            logits_indices=(query_start[1:][sampling] - 1).astype(np.int64),
            pending_rows=rows_sources[:, 0].copy(),
            pending_sources=rows_sources[:, 1].copy(),
        )

    @property
    def max_query_len(self) -> int:
        return int(np.diff(self.query_start_loc).max())

    @property
    def num_decodes(self) -> int:
        """How many sequences from the first have one query token (the scheduler's decodes
        come first)."""
        q_lens = np.diff(self.query_start_loc)
        longer = np.flatnonzero(q_lens != 1)
        return int(longer[0]) if len(longer) else len(q_lens)

    @property
    def max_seq_len(self) -> int:
        return int(self.seq_lens.max())

    def header(self) -> list[int]:
        """The sizes `pack` writes first (HEADER of them)."""
        num_seqs, width = self.block_tables.shape
        return [len(self.input_ids), num_seqs, width, len(self.logits_indices),
                len(self.pending_rows)]  # fmt: skip

    def pack(self) -> np.ndarray:
        """All arrays in one int64 vector behind a header of their sizes."""
        parts = [
            np.array(self.header(), dtype=np.int64),
            self.input_ids,
            self.positions,
            self.slot_mapping,
            self.block_tables.ravel(),
            self.query_start_loc,
            self.seq_lens,
            self.logits_indices,
            self.pending_rows,
            self.pending_sources,
        ]
        return np.concatenate([p.astype(np.int64, copy=False) for p in parts])

    @classmethod
    def unpack(cls, packed: np.ndarray) -> StepPlan:
        ids, pos, slots, tables, qsl, lens, logit_rows, p_rows, p_sources = np.split(
            packed[HEADER:], np.cumsum(cls.part_sizes(packed[:HEADER]))[:-1]
        )
        num_seqs, width = int(packed[1]), int(packed[2])
        return cls(
            input_ids=ids,
            positions=pos,
            slot_mapping=slots,
            block_tables=tables.astype(np.int32).reshape(num_seqs, width),
            query_start_loc=qsl.astype(np.int32),
            seq_lens=lens.astype(np.int32),
            logits_indices=logit_rows,
            pending_rows=p_rows,
            pending_sources=p_sources,
        )

    def offsets(self) -> dict[str, int]:
        """Where `pack` puts each array, in elements from the packed vector's start."""
        sizes = self.part_sizes(self.header())
        starts = np.cumsum([HEADER, *sizes[:-1]]).tolist()
        return dict(zip(PACKED_ARRAYS, starts, strict=True))

    @staticmethod
    def part_sizes(header) -> list[int]:
        """Lengths of the packed arrays after the header, in `pack`'s order."""
        tokens, num_seqs, width, sampling, pending = (int(v) for v in header)
        return [tokens, tokens, tokens, num_seqs * width, num_seqs + 1, num_seqs, sampling,
                pending, pending]  # fmt: skip


def _long_rope_rows(chunks, q_lens, positions: np.ndarray, rule: LongPromptRope) -> np.ndarray:
    """Rows of a LongRoPE table: positions below `rule.original` of a sequence longer than
    that move to the long-factor rows (see LongPromptRope)."""
    long_seq = np.array([c.seq.num_tokens > rule.original for c in chunks])
    shift = np.repeat(long_seq, q_lens) & (positions < rule.original)
    return positions + shift * rule.offset
