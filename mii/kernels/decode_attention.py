"""Split-K ("flash-decoding") attention for decodes: one query token per sequence.

A decode step has only batch x kv_heads independent (sequence, kv head) pairs; at small
batches that is far fewer programs than the GPU has SMs, and each streams its whole
context alone. Splitting every context into `num_splits` equal ranges multiplies the
programs. The splits meet without a second launch (at batch 1 a merge kernel cost about
2.4 us a layer, launch-bound): each stores its normalised output and log2-sum-exp2 for its
group's query heads, then bumps its (sequence, kv head)'s arrival counter (one acq_rel
atomic, as the split-K GEMV); the program that arrives last merges the splits' partials
(in the same order whichever program it is), stores the output in q's dtype and puts the
counter back to 0.

The counters (one int32 per sequence and kv head, with the lse partials) come from the
GEMV's `cached_workspace`: allocated zeroed on first use per (device, batch, heads, splits)
and kept, so calls that share them must run in stream order (one stream per device, as the
engine's decode steps). One first allocated inside a CUDA graph capture would be zeroed only
when the graph replays: the engine runs each batch size eagerly before capturing it.

Each split's range is a share of its own sequence's length (not of the block table's
width), so every split has work and the grid depends on host-known sizes only: the launch
is safe to capture in a CUDA graph and replay with other context lengths.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.attention_tiles import (
    ScoreOptions,
    attend_range,
    check_paged_inputs,
    dot_precision,
    dot_width,
    kv_scale_args,
)
from mii.kernels.gemv import arrive_last, cached_workspace

# Small batches are latency bound: many short splits (a few tiles each) keep enough loads
# in flight. Beyond a few programs per SM, more splits only add merge work.
MIN_KEYS_PER_SPLIT = 128
MAX_PROGRAMS_PER_SM = 4
# The merge reads SPLIT_CHUNK splits of every head of the group a step: a (group, chunk,
# head dim) float32 tile of this many elements (32 registers a thread at 4 warps).
MERGE_TILE = 4096


class SplitConfig(NamedTuple):
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def for_head_dim(cls, head_dim: int) -> SplitConfig:
        """Heads of 256 (Gemma): half-width key tiles, two stages (shared memory)."""
        return cls(32, 4, 2) if head_dim > 128 else cls()


def split_chunk(group: int, block_d: int) -> int:
    """Splits the merge reads a step: MERGE_TILE elements over the group's padded heads."""
    return max(1, MERGE_TILE // (triton.next_power_of_2(group) * block_d))


# No specialisation of num_splits: a constant 1 would compile a kernel apart.
@triton.jit(do_not_specialize=["num_splits"])
def _split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr, count_ptr,
    block_tables_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_splits,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_table, window, softcap_inv, softcap_log2e,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, SPLIT_CHUNK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, KV_SCALED: tl.constexpr,
):  # fmt: skip
    """Grid (sequences, kv heads, splits). The group's query heads are the tile's rows.
    An fp8 cache (KV_SCALED): the K scale joins qk_scale, the V scale each split's output
    (the merge is a weighted mean of the splits, so it commutes with the scale)."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # The splits share the keys the query sees: all of them, or its window's.
    window_lo = 0
    if SLIDING:
        window_lo = tl.maximum(seq_len - window, 0)
    lo = window_lo // BLOCK_N * BLOCK_N
    # Tile-aligned ranges, so only the window's first and the sequence's last tile need a mask.
    chunk = tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, seq_len)
    head_end = tl.minimum(end, tl.maximum(start, tl.cdiv(window_lo, BLOCK_N) * BLOCK_N))
    full_end = tl.maximum(head_end, end // BLOCK_N * BLOCK_N)

    rows = tl.minimum(tl.arange(0, BLOCK_M), GROUP - 1)  # padding rows redo the last head
    row_ok = tl.arange(0, BLOCK_M) < GROUP
    head = kv_head * GROUP + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_offs = seq * stride_q_seq + head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=d_ok[None, :], other=0.0)
    q_pos = tl.zeros((BLOCK_M,), dtype=tl.int32) + seq_len - 1

    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head)
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    k_ptr = k_cache_ptr + kv_head * stride_k_head
    v_ptr = v_cache_ptr + kv_head * stride_v_head
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SLIDING:  # the window's first tile, partly before the window
        acc, m_i, l_i = attend_range(
            acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, start, head_end, seq_len,
            qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
            window, softcap_inv, softcap_log2e,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, True, DOT_PRECISION, SLIDING, SOFTCAP,
        )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, head_end, full_end, seq_len,
        qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
        window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, False, DOT_PRECISION, SLIDING, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, full_end, end, seq_len,
        qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
        window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, True, DOT_PRECISION, SLIDING, SOFTCAP,
    )  # fmt: skip

    if KV_SCALED:
        acc = acc * tl.load(v_scale_ptr + kv_head)
    out_ptrs = out_ptr + seq * stride_o_seq + head[:, None] * stride_o_head + offs_d[None, :]
    out_mask = row_ok[:, None] & d_ok[None, :]
    if SINGLE_SPLIT:
        tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # An empty split (short sequence) leaves l = 0: weight exp2(-inf) = 0 in the merge.
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        part = (seq * tl.num_programs(1) * GROUP + head) * num_splits  # (B, Hq, S) row starts
        tl.store(part_lse_ptr + part + split, lse, mask=row_ok)
        p_offs = (part + split)[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(part_out_ptr + p_offs, out, mask=out_mask)
        count = count_ptr + seq * tl.num_programs(1) + kv_head
        if arrive_last(count, num_splits):  # the group's merge
            seq_parts = seq * tl.num_programs(1) * GROUP * num_splits  # the sequence's (Hq, S)
            _merge_splits(
                out_ptr + seq * stride_o_seq, stride_o_head, part_out_ptr + seq_parts * HEAD_DIM,
                part_lse_ptr + seq_parts, kv_head * GROUP, num_splits,
                GROUP, HEAD_DIM, BLOCK_D, SPLIT_CHUNK,
            )  # fmt: skip
            tl.atomic_xchg(count, 0)  # clean for the next call


@triton.jit
def _merge_splits(
    out_ptr, stride_o_head, part_out_ptr, part_lse_ptr, first_head, num_splits,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    SPLIT_CHUNK: tl.constexpr,
):  # fmt: skip
    """Stores the outputs of the GROUP heads from `first_head` (the pointers at the
    sequence's output and partials): the softmax-weighted mean of the splits' normalised
    outputs, weight exp2(lse - max lse), an empty split's 0. A loop over the splits at run
    time, SPLIT_CHUNK splits of every head a step: the loads of a step are independent, so
    a step costs one L2 round trip, not one a split. Summed in a fixed order whichever
    program is last. Loads are .cg: from L2, where the other programs' stores are (not a
    stale L1 line)."""
    rows = tl.arange(0, triton.next_power_of_2(GROUP))
    heads = first_head + tl.minimum(rows, GROUP - 1)  # padding rows redo the last head
    lse_rows = part_lse_ptr + heads[:, None] * num_splits  # (G, 1)
    lanes = tl.arange(0, 64)  # splits a step of the max: all of them up to 64
    lse_max = tl.full(heads.shape, float("-inf"), dtype=tl.float32)
    for s0 in range(0, num_splits, 64):  # split 0 always has keys: the max is finite
        ok = s0 + lanes < num_splits
        lse = tl.load(lse_rows + s0 + lanes[None, :], mask=ok[None, :], other=float("-inf"),
                      cache_modifier=".cg")  # fmt: skip
        lse_max = tl.maximum(lse_max, tl.max(lse, 1))

    chunk = tl.arange(0, SPLIT_CHUNK)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    total = tl.zeros((heads.shape[0], BLOCK_D), dtype=tl.float32)
    weights = tl.zeros(heads.shape, dtype=tl.float32)
    for s0 in range(0, num_splits, SPLIT_CHUNK):
        ok = s0 + chunk < num_splits
        lse = tl.load(lse_rows + s0 + chunk[None, :], mask=ok[None, :], other=float("-inf"),
                      cache_modifier=".cg")  # fmt: skip
        weight = tl.math.exp2(lse - lse_max[:, None])  # (G, C); 0 for no keys or no split
        part = (heads[:, None] * num_splits + s0 + chunk[None, :])[:, :, None]  # (G, C, 1)
        p_mask = ok[None, :, None] & d_ok[None, None, :]
        parts = tl.load(part_out_ptr + part * HEAD_DIM + offs_d[None, None, :], mask=p_mask,
                        other=0.0, cache_modifier=".cg")  # fmt: skip
        total += tl.sum(parts * weight[:, :, None], 1)
        weights += tl.sum(weight, 1)
    out = total / weights[:, None]
    o_ptrs = out_ptr + heads[:, None] * stride_o_head + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=(rows < GROUP)[:, None] & d_ok)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_splits(batch: int, kv_heads: int, max_context: int, sm_count: int) -> int:
    """Double the splits while the grid stays within MAX_PROGRAMS_PER_SM programs per SM
    and each split keeps at least MIN_KEYS_PER_SPLIT keys of the longest possible context."""
    splits = 1
    while (
        batch * kv_heads * splits * 2 <= MAX_PROGRAMS_PER_SM * sm_count
        and max_context >= 2 * splits * MIN_KEYS_PER_SPLIT
    ):
        splits *= 2
    return splits


def _num_splits(q, k_cache, block_tables, window: int | None) -> int:
    sm_count = _sm_count(q.device.index or 0) if q.is_cuda else 132
    max_context = block_tables.shape[1] * k_cache.shape[1]
    if window is not None:  # a split covers keys of the window only
        max_context = min(max_context, window + 1)
    return default_num_splits(q.shape[0], k_cache.shape[2], max_context, sm_count)


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    num_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, Hq, D), one token per sequence at position seq_lens - 1. Returns (B, Hq, D),
    the same as `torch_ref.paged_attention_ref` with every query length 1. `k_scale`,
    `v_scale`: an fp8 cache's (Hkv,)."""
    splits = num_splits or _num_splits(q, k_cache, block_tables, window)
    options = ScoreOptions.of(scale, window, softcap)
    config = SplitConfig.for_head_dim(q.shape[2])
    return launch(
        q, k_cache, v_cache, block_tables, seq_lens, scale, splits, config, options,
        k_scale, v_scale,
    )  # fmt: skip


def launch(
    q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, config, options=None,
    k_scale=None, v_scale=None,
):  # fmt: skip
    """`decode_attention` with the split count and tile shape given (benchmarks)."""
    options = options or ScoreOptions.of(scale, None, None)
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    assert q.shape[0] == seq_lens.shape[0], "one query token per sequence"
    assert num_splits >= 1
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    out = torch.empty((batch, q_heads, head_dim), dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    part_out, part_lse, counters = out, out, out  # one split writes the output directly
    if num_splits > 1:  # (B, Hq, S, D) normalised outputs, (B, Hq, S) log2-sum-exp2
        part_out = torch.empty((batch, q_heads, num_splits, head_dim), device=q.device)
        # The lse partials and the (B, Hkv) counters are small: cached. The outputs' are
        # not, so eager calls of many batch sizes keep nothing large.
        part_lse, counters = cached_workspace(
            q.device, (batch, q_heads, num_splits), batch * kv_heads
        )
    group = q_heads // kv_heads
    k_scale, v_scale, kv_scaled = kv_scale_args(q, k_scale, v_scale)
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, counters, block_tables, seq_lens,
        k_scale, v_scale,
        options.qk_scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), options.window, options.softcap_inv, options.softcap_log2e,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=dot_width(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config.block_n, SINGLE_SPLIT=num_splits == 1,
        SPLIT_CHUNK=split_chunk(group, dot_width(head_dim)),
        DOT_PRECISION=dot_precision(q.dtype), SLIDING=options.sliding, SOFTCAP=options.softcap,
        KV_SCALED=kv_scaled, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
