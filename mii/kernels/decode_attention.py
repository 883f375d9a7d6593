"""Split-K ("flash-decoding") attention for decodes: one query token per sequence.

A decode step has only batch x kv_heads independent (sequence, kv head) pairs; at small
batches that is far fewer programs than the GPU has SMs, and each streams its whole
context alone. Splitting every context into `num_splits` equal ranges multiplies the
programs; a second small kernel merges the partial softmaxes.

Each split's range is a share of its own sequence's length (not of the block table's
width), so every split has work and the grid depends on host-known sizes only: the launch
is safe to capture in a CUDA graph and replay with other context lengths.

The merge stays a kernel of its own: folded into the split kernel (the last split of each
sequence and head to arrive merged them, as the split-K GEMV sums its parts) it measured
slower at batch 1 (Mistral-7B, H200s, two calls): 10.6 us a layer against 5.8 + 3.4 (the merge,
serial after the last split, waits on L2 round trips that the separate launch overlaps).
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
    attention_output,
    check_paged_inputs,
    dot_precision,
    dot_width,
    kv_scale_args,
    scaled_query,
)
from mii.kernels.pdl import enter, pdl_args, release_next, wait_prior

# Small batches are latency bound: many short splits (a few tiles each) keep enough loads
# in flight. Beyond a few programs per SM, more splits only add merge work.
MIN_KEYS_PER_SPLIT = 128
MAX_PROGRAMS_PER_SM = 4


class SplitConfig(NamedTuple):
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3

    @classmethod
    def for_cache(cls, head_dim: int, cache_dtype: torch.dtype) -> SplitConfig:
        """Heads of 256 (Gemma): half-width key tiles, two stages (shared memory). An fp8
        cache: two stages (bench_decode_sweep.py --fp8 on an H100, 256 sequences of 576
        keys: 0.65 of copy bandwidth against 0.59 with three)."""
        if head_dim > 128:
            return cls(32, 4, 2)
        return cls(num_stages=2) if cache_dtype == torch.float8_e4m3fn else cls()


# No specialisation of num_splits: a constant 1 would compile a kernel apart.
@triton.jit(do_not_specialize=["num_splits"])
def _split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_lse_ptr,
    block_tables_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_splits,
    stride_q_seq, stride_q_head, stride_o_seq, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_table, window, softcap_inv, softcap_log2e,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SLIDING: tl.constexpr, SOFTCAP: tl.constexpr, KV_SCALED: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """Grid (sequences, kv heads, splits). The group's query heads are the tile's rows.
    An fp8 cache (KV_SCALED): the K scale joins qk_scale, the V scale each split's output
    (the merge is a weighted mean of the splits, so it commutes with the scale)."""
    release_next(PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait: an fp8 cache's scales (constant; the V scale, loaded after the loop,
    # cost every split a round trip to memory at its end) and the sequence's length (a step
    # input, kernels/pdl.py): after the wait the block table is the first load.
    if KV_SCALED:
        k_scale = tl.load(k_scale_ptr + kv_head)
        v_scale = tl.load(v_scale_ptr + kv_head)
    seq_len = tl.load(seq_lens_ptr + seq)
    wait_prior(PDL)
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

    if KV_SCALED:  # an fp8 cache: qk = q . k_fp8 * (scale * k_scale)
        q, q_unit = scaled_query(q)
        qk_scale = qk_scale * k_scale * q_unit
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
            KV_SCALED,
        )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, head_end, full_end, seq_len,
        qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
        window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, False, DOT_PRECISION, SLIDING, SOFTCAP,
        KV_SCALED,
    )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, full_end, end, seq_len,
        qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
        window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, True, DOT_PRECISION, SLIDING, SOFTCAP,
        KV_SCALED,
    )  # fmt: skip

    if KV_SCALED:
        acc = acc * v_scale
    if SINGLE_SPLIT:
        out = acc / l_i[:, None]
        o_offs = seq * stride_o_seq + head[:, None] * stride_o_head + offs_d[None, :]
        tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)
    else:
        # An empty split (short sequence) leaves l = 0: weight exp2(-inf) = 0 in the merge.
        has_keys = l_i > 0
        out = tl.where(has_keys[:, None], acc / tl.maximum(l_i, 1e-30)[:, None], 0.0)
        lse = tl.where(has_keys, m_i + tl.math.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        part = (seq * tl.num_programs(1) * GROUP + head) * num_splits + split  # (B, Hq, S)
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        p_offs = part[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(part_out_ptr + p_offs, out, mask=row_ok[:, None] & d_ok)


@triton.jit
def _merge_kernel(
    out_ptr, part_out_ptr, part_lse_ptr, num_splits, stride_o_seq, stride_o_head,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """Grid (sequences, q heads): softmax-weighted sum of the splits' normalised outputs."""
    enter(PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    part = (seq * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(part_lse_ptr + part + offs_s, mask=s_ok, other=float("-inf"))
    # the outputs' load before the maximum's barrier, which would hold it back until the
    # log-sum-exps arrive: one round trip to memory for both instead of two in a row
    p_offs = (part + offs_s)[:, None] * HEAD_DIM + offs_d[None, :]
    parts = tl.load(part_out_ptr + p_offs, mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    weight = tl.math.exp2(lse - tl.max(lse, 0))  # split 0 always has keys: max is finite
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    o_offs = seq * stride_o_seq + head * stride_o_head + offs_d
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=d_ok)


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: (B, Hq, D), one token per sequence at position seq_lens - 1. Returns (B, Hq, D),
    the same as `torch_ref.paged_attention_ref` with every query length 1. `k_scale`,
    `v_scale`: an fp8 cache's (Hkv,). `out`: where to write it (B, Hq, D) (else new)."""
    splits = num_splits or _num_splits(q, k_cache, block_tables, window)
    options = ScoreOptions.of(scale, window, softcap)
    config = SplitConfig.for_cache(q.shape[2], k_cache.dtype)
    return launch(
        q, k_cache, v_cache, block_tables, seq_lens, scale, splits, config, options,
        k_scale, v_scale, out,
    )  # fmt: skip


def launch(
    q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits, config, options=None,
    k_scale=None, v_scale=None, out=None,
):  # fmt: skip
    """`decode_attention` with the split count and tile shape given (benchmarks)."""
    options = options or ScoreOptions.of(scale, None, None)
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    assert q.shape[0] == seq_lens.shape[0], "one query token per sequence"
    assert num_splits >= 1
    batch, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    out = attention_output(q, out)
    if batch == 0:
        return out
    part_out, part_lse = out, out  # one split writes the output directly
    if num_splits > 1:  # (B, Hq, S, D) normalised outputs, (B, Hq, S) log2-sum-exp2
        part_out = torch.empty((batch, q_heads, num_splits, head_dim), device=q.device)
        part_lse = torch.empty((batch, q_heads, num_splits), device=q.device)
    group = q_heads // kv_heads
    k_scale, v_scale, kv_scaled = kv_scale_args(q, k_scale, v_scale)
    pdl = pdl_args(q)
    _split_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, block_tables, seq_lens, k_scale, v_scale,
        options.qk_scale, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), options.window, options.softcap_inv, options.softcap_log2e,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=dot_width(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=max(16, triton.next_power_of_2(group)),
        BLOCK_N=config.block_n, SINGLE_SPLIT=num_splits == 1,
        DOT_PRECISION=dot_precision(q.dtype), SLIDING=options.sliding, SOFTCAP=options.softcap,
        KV_SCALED=kv_scaled, num_warps=config.num_warps, num_stages=config.num_stages,
        **pdl,
    )  # fmt: skip
    if num_splits > 1:
        _merge_kernel[(batch, q_heads)](
            out, part_out, part_lse, num_splits, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_S=triton.next_power_of_2(num_splits), **pdl,
        )  # fmt: skip
    return out
