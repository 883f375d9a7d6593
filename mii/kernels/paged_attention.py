"""Ragged paged attention: one launch serves a step's prompt chunks and its decodes.

Each kv head's `group` query heads are packed into the rows of one tile: row `r` of a
sequence is its query token `r // group`, query head `r % group`, so every K/V tile loaded
from the cache serves the whole group (a decode's 4 or 8 heads become the M dimension of
`tl.dot`). A sequence of `q_len` tokens owns `cdiv(q_len * group, BLOCK_M)` row tiles.

Grid: (row tiles of all sequences, kv heads). Sequence `i`'s tiles start at index
`query_start_loc[i] * group // BLOCK_M + i`, which leaves room for each sequence's tiles
without knowing the query lengths on the host: `T * group // BLOCK_M + B` programs cover
them all, and a program finds its sequence by binary search over `query_start_loc`.
Programs past the end of their sequence's tiles return at once.
"""

from __future__ import annotations

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
from mii.kernels.decode_attention import decode_attention


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, tile, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The last sequence whose first tile index is <= tile."""
    lo = num_seqs * 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first = tl.load(query_start_loc_ptr + mid) * GROUP // BLOCK_M + mid
        if first <= tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


# No specialisation of num_seqs: a constant 1 would turn the binary search into constexprs.
@triton.jit(do_not_specialize=["num_seqs"])
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    block_tables_ptr, query_start_loc_ptr, seq_lens_ptr, k_scale_ptr, v_scale_ptr,
    qk_scale, num_seqs,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_block, stride_k_slot, stride_k_head,
    stride_v_block, stride_v_slot, stride_v_head,
    stride_table, window, softcap_inv, softcap_log2e,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SLIDING: tl.constexpr, SOFTCAP: tl.constexpr,
    KV_SCALED: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, num_seqs, tile, GROUP, BLOCK_M)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_end = tl.load(query_start_loc_ptr + seq + 1)
    num_rows = (q_end - q_start) * GROUP
    first_tile = q_start * GROUP // BLOCK_M + seq
    span = q_end * GROUP // BLOCK_M + seq + 1 - first_tile
    # Last (longest, causally) tiles first: the short ones then fill the tail of the grid.
    row0 = (span - 1 - (tile - first_tile)) * BLOCK_M
    if row0 >= num_rows:
        return

    rows = row0 + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    rows = tl.minimum(rows, num_rows - 1)  # padding rows redo the last real row, unstored
    token = q_start + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    context = tl.load(seq_lens_ptr + seq) - (q_end - q_start)  # cached tokens before the chunk
    q_pos = context + rows // GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_offs = token[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :]
    q = tl.load(q_ptr + q_offs, mask=d_ok[None, :], other=0.0)

    # Keys below the tile's first row position are visible to every row: no mask there.
    # With a window, keys the last row's window still holds are the lower edge of that.
    first_pos = context + row0 // GROUP
    last_pos = context + (tl.minimum(row0 + BLOCK_M, num_rows) - 1) // GROUP
    unmasked_end = (first_pos + 1) // BLOCK_N * BLOCK_N
    lo = 0
    unmasked_lo = 0
    if SLIDING:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        shared_lo = tl.cdiv(tl.maximum(last_pos - window + 1, 0), BLOCK_N) * BLOCK_N
        unmasked_lo = tl.minimum(shared_lo, unmasked_end)
    if KV_SCALED:  # an fp8 cache: qk = q . k_fp8 * (scale * k_scale)
        q, q_unit = scaled_query(q)
        qk_scale = qk_scale * tl.load(k_scale_ptr + kv_head) * q_unit
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_table
    k_ptr = k_cache_ptr + kv_head * stride_k_head
    v_ptr = v_cache_ptr + kv_head * stride_v_head
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if SLIDING:  # the window's lower edge: keys some rows no longer see
        acc, m_i, l_i = attend_range(
            acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, lo, unmasked_lo, last_pos + 1,
            qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
            window, softcap_inv, softcap_log2e,
            BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, True, DOT_PRECISION, SLIDING, SOFTCAP,
        )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, unmasked_lo, unmasked_end,
        last_pos + 1, qk_scale, stride_k_block, stride_k_slot, stride_v_block, stride_v_slot,
        window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, False, DOT_PRECISION, SLIDING, SOFTCAP,
    )  # fmt: skip
    acc, m_i, l_i = attend_range(
        acc, m_i, l_i, q, q_pos, k_ptr, v_ptr, table_ptr, unmasked_end, last_pos + 1,
        last_pos + 1, qk_scale, stride_k_block, stride_k_slot, stride_v_block,
        stride_v_slot, window, softcap_inv, softcap_log2e,
        BLOCK_N, BLOCK_SIZE, HEAD_DIM, BLOCK_D, True, DOT_PRECISION, SLIDING, SOFTCAP,
    )  # fmt: skip

    out = acc / l_i[:, None]
    if KV_SCALED:  # softmax(...) @ (v_fp8 * v_scale)
        out = out * tl.load(v_scale_ptr + kv_head)
    o_offs = token[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :]
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok)


def tile_config(max_rows: int, head_dim: int) -> TileConfig:
    """Tile sizes for the longest sequence's packed rows (query tokens x group), as
    measured on an H100 (scripts/bench_kernels.py) for head dims 64 and 128. Heads of 256
    (Gemma) take half-width key tiles and two stages, to stay within shared memory."""
    if head_dim > 128:
        return TileConfig(16 if max_rows <= 16 else 64, 32, 4, 2)
    if max_rows <= 16:  # decodes: memory bound, a narrow M keeps the dot cheap
        return TileConfig(16, 128, 4, 3)
    if max_rows <= 64:
        return TileConfig(64, 64, 4, 3)
    return TileConfig(128, 64, 4, 3)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    *,
    max_query_len: int,
    window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    num_decodes: int = 0,
    prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Triton version of `torch_ref.paged_attention_ref`. `max_query_len` is a host int
    (no sync): it picks the tile shape. `k_scale`, `v_scale`: an fp8 cache's (Hkv,).

    A mixed step whose first `num_decodes` sequences have one query token each (the
    scheduler puts the decodes first) can send those to the split-K decode kernel and only
    the rest through this one: give `prompts`, the rest's (block_tables, query_start_loc
    from 0, seq_lens) in tensors of their own (`dispatch.split_prompts`). In one launch the tile
    shape is the longest chunk's (128 packed rows), and each decode's program would run
    it, 4 of its rows used at a group of 4, over the decode's whole context."""
    # A table too narrow for the longest chunk would send the kernel past its end (the
    # reference fails on it too); seq_lens cannot be checked without a sync.
    assert block_tables.shape[1] * k_cache.shape[1] >= max_query_len, "block table too narrow"
    group = q.shape[1] // k_cache.shape[2]
    config = tile_config(max_query_len * group, q.shape[2])
    options = ScoreOptions.of(scale, window, softcap)
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    d = num_decodes
    if prompts is None or not 0 < d < seq_lens.shape[0]:
        return launch(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, config,
            options, **scales,
        )  # fmt: skip
    prompt_tables, prompt_starts, prompt_lens = prompts
    assert prompt_starts.shape == (seq_lens.shape[0] - d + 1,), "prompts: B - d sequences"
    out = attention_output(q, None)
    decode_attention(
        q[:d], k_cache, v_cache, block_tables[:d], seq_lens[:d], scale, window=window,
        softcap=softcap, out=out[:d], **scales,
    )  # fmt: skip
    launch(
        q[d:], k_cache, v_cache, prompt_tables, prompt_starts, prompt_lens, scale, config,
        options, out=out[d:], **scales,
    )  # fmt: skip
    return out


def launch(
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, config, options=None,
    k_scale=None, v_scale=None, out=None,
):  # fmt: skip
    """`paged_attention` with the tile shape given (benchmarks sweep it); `out`: where to
    write the result (else new)."""
    options = options or ScoreOptions.of(scale, None, None)
    check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, k_scale, v_scale)
    assert query_start_loc.dtype == torch.int32
    assert query_start_loc.shape == (seq_lens.shape[0] + 1,)
    assert query_start_loc.device == q.device
    tokens, q_heads, head_dim = q.shape
    kv_heads = k_cache.shape[2]
    group = q_heads // kv_heads
    out = attention_output(q, out)
    num_seqs = seq_lens.shape[0]
    if tokens == 0 or num_seqs == 0:
        return out
    grid = (tokens * group // config.block_m + num_seqs, kv_heads)
    k_scale, v_scale, kv_scaled = kv_scale_args(q, k_scale, v_scale)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens, k_scale, v_scale,
        options.qk_scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), options.window, options.softcap_inv, options.softcap_log2e,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=dot_width(head_dim),
        BLOCK_SIZE=k_cache.shape[1], BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        DOT_PRECISION=dot_precision(q.dtype), SLIDING=options.sliding, SOFTCAP=options.softcap,
        KV_SCALED=kv_scaled, num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out
