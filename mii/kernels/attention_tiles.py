"""Pieces shared by the paged attention kernels: the online-softmax loop over a range of
cached keys, and the launcher checks of the paged cache.

The loop reads keys and values straight from the paged cache through a sequence's block
table row; one tile of `BLOCK_N` key positions spans `BLOCK_N // BLOCK_SIZE` cache blocks.
Scores live in the log2 domain (`scale * log2(e)` folded into one multiply) so the
softmax runs on `exp2`. Two options are compile-time flags, so that a model without them
runs the very loop it ran before: SLIDING (a row sees keys `> q_pos - window` only) and
SOFTCAP (scores `softcap * tanh(score / softcap)`, Gemma-2).

An fp8 cache: tiles are widened after they load to float16 (exact; 16-bit queries are
brought to it too, `scaled_query`) and the products run in float16; the launchers fold
the per-head K scale into `qk_scale` and the V scale into the output, so the loop itself
never multiplies by a scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.jit_math import tanh

LOG2E = 1.4426950408889634


@triton.jit
def load_kv_tile(
    cache_ptr,
    table_ptr,
    offs_n,
    offs_d,
    seq_len,
    stride_block,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
):
    """(BLOCK_N, BLOCK_D) keys or values at positions `offs_n`; `cache_ptr` is already
    offset to the kv head. Positions past `seq_len` read zeros when MASKED."""
    if MASKED:
        in_seq = offs_n < seq_len
        block = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=in_seq, other=0)
    else:
        block = tl.load(table_ptr + offs_n // BLOCK_SIZE)
    # int64: block * stride_block overflows int32 in caches of a few GiB per layer.
    rows = block.to(tl.int64) * stride_block + (offs_n % BLOCK_SIZE) * stride_slot
    ptrs = cache_ptr + rows[:, None] + offs_d[None, :]
    if MASKED:
        mask = in_seq[:, None] & (offs_d[None, :] < HEAD_DIM)
        return tl.load(ptrs, mask=mask, other=0.0)
    if BLOCK_D == HEAD_DIM:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)


@triton.jit
def scaled_query(q):
    """An fp8 cache's query as the products' operand, and the power of two (BLOCK_M, 1)
    that each row was divided by (the caller multiplies qk_scale by it). e4m3 widens to
    float16 in one instruction a pair and to bfloat16 only through float16 (three), so
    16-bit queries multiply in float16. A bfloat16 row can pass float16's 65504, though
    (biased q projections do), so each row is first brought to a largest magnitude in
    [2^14, 2^15) by a power of two: exact, and leaves float16's subnormals to elements
    2^38 below their row's largest. Float16 queries are already the operand; float32
    queries (tests) stay float32."""
    row_unit = 1.0
    if q.dtype == tl.bfloat16:
        q = q.to(tl.float32)
        amax = tl.max(tl.abs(q), 1)
        # 2^floor(log2(amax)) and its inverse from the exponent bits: exact (a zero row
        # gets unit 0, and its scores stay 0)
        unit_bits = amax.to(tl.int32, bitcast=True) & 0x7F800000
        unit = unit_bits.to(tl.float32, bitcast=True)
        inv = (0x7F000000 - unit_bits).to(tl.float32, bitcast=True)
        q = (q * (inv * 16384.0)[:, None]).to(tl.float16)
        row_unit = (unit * (1.0 / 16384.0))[:, None]
    return q, row_unit


@triton.jit
def widen_values(v, offs_n, seq_len, dtype: tl.constexpr):
    """A value tile as `dtype` for the P @ V product. An fp8 tile is widened in registers,
    in the layout it loaded in, before its layout changes to the product's operand (the
    select on `offs_n` pins it there): left to itself Triton changes the layout first, in
    shared memory at one byte an element, and the product's operand, strided along the keys
    it sums over, then reads back one byte per instruction (64 `LDS.U8` a 64-key tile per
    thread on sm_90, against 4 `LDS.128` and a transposing `ldmatrix` this way). Positions
    past `seq_len` read as zero either way (masked loads give zeros there already)."""
    if v.dtype == tl.float8e4nv:
        v = tl.where((offs_n < seq_len)[:, None], v.to(dtype), 0.0)
    else:
        v = v.to(dtype)
    return v


@triton.jit
def score_tile(q, k, qk_scale, softcap_inv, softcap_log2e, DOT_PRECISION: tl.constexpr,
               SOFTCAP: tl.constexpr):  # fmt: skip
    """(BLOCK_M, BLOCK_N) scores in the log2 domain. Without SOFTCAP, qk_scale is
    scale * log2(e); with it, qk_scale is the plain scale and the cap converts."""
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    if SOFTCAP:
        qk = softcap_log2e * tanh(qk * softcap_inv)
    return qk


@triton.jit
def visible(offs_n, q_pos, window, SLIDING: tl.constexpr):
    """(BLOCK_M, BLOCK_N): which keys each row attends to (causal, and its window)."""
    ok = offs_n[None, :] <= q_pos[:, None]
    if SLIDING:
        ok = ok & (offs_n[None, :] > q_pos[:, None] - window)
    return ok


@triton.jit
def attend_range(
    acc,
    m_i,
    l_i,
    q,
    q_pos,
    k_ptr,
    v_ptr,
    table_ptr,
    start,
    end,
    seq_len,
    qk_scale,
    stride_k_block,
    stride_k_slot,
    stride_v_block,
    stride_v_slot,
    window,
    softcap_inv,
    softcap_log2e,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
    V_FIRST: tl.constexpr = False,
):
    """Online softmax of the (BLOCK_M, BLOCK_D) queries `q` over key positions
    [start, end). MASKED applies the causal mask `key <= q_pos` per row (and the window
    when SLIDING, and the sequence end); unmasked ranges must lie wholly inside every row's
    visible keys.

    V_FIRST: each tile's V load is issued before its K load, so both are in flight before
    the first barrier; after the scores, as otherwise, V's load waits for them, one more
    round trip to memory a tile. The decode kernel's splits are a tile or two long at batch
    1, where that round trip is on the step's path: it sets V_FIRST for an fp8 cache, whose
    V tile `widen_values` pins in its load layout (so K's load is not held back behind V's
    layout change). A bf16 cache keeps the old order: with V_FIRST (its V tile pinned by the
    same select) a Mistral-7B token took 4.31-4.32 ms against 3.98-4.03 on an H200. The
    prefill kernel, compute-bound, keeps the order it was measured with.

    acc: (BLOCK_M, BLOCK_D) fp32 unnormalised output; m_i, l_i: (BLOCK_M,) running max
    (log2 domain) and running sum of exp2.
    """
    offs_d = tl.arange(0, BLOCK_D)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        if V_FIRST:
            v = load_kv_tile(
                v_ptr, table_ptr, offs_n, offs_d, seq_len, stride_v_block, stride_v_slot,
                BLOCK_SIZE, HEAD_DIM, BLOCK_D, MASKED,
            )  # fmt: skip
        k = load_kv_tile(
            k_ptr, table_ptr, offs_n, offs_d, seq_len, stride_k_block, stride_k_slot,
            BLOCK_SIZE, HEAD_DIM, BLOCK_D, MASKED,
        )  # fmt: skip
        k = k.to(q.dtype)  # an fp8 cache's tile; a no-op otherwise
        qk = score_tile(q, k, qk_scale, softcap_inv, softcap_log2e, DOT_PRECISION, SOFTCAP)
        if MASKED:
            qk = tl.where(visible(offs_n, q_pos, window, SLIDING), qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_ref = m_new
        if SLIDING:
            # A row may see no key yet (a tile at its window's lower edge): exponents
            # relative to 0 keep exp2(-inf - -inf) from making NaN; its maximum stays -inf.
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        if not V_FIRST:
            v = load_kv_tile(
                v_ptr, table_ptr, offs_n, offs_d, seq_len, stride_v_block, stride_v_slot,
                BLOCK_SIZE, HEAD_DIM, BLOCK_D, MASKED,
            )  # fmt: skip
        v = widen_values(v, offs_n, seq_len, q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


class ScoreOptions(NamedTuple):
    """The launch arguments of the sliding window and soft-capping (see attend_range)."""

    qk_scale: float
    window: int
    softcap_inv: float
    softcap_log2e: float
    sliding: bool
    softcap: bool

    @classmethod
    def of(cls, scale: float, window: int | None, softcap: float | None) -> ScoreOptions:
        assert window is None or window >= 1, "a sliding window holds at least one key"
        assert softcap is None or softcap > 0
        if softcap is None:
            return cls(scale * LOG2E, window or 0, 0.0, 0.0, window is not None, False)
        return cls(scale, window or 0, 1.0 / softcap, softcap * LOG2E, window is not None, True)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 tests want exact fp32 products, not the TF32 that tl.dot uses by default."""
    return "ieee" if dtype == torch.float32 else "tf32"


def dot_width(head_dim: int) -> int:
    """Head dim padded for tl.dot, which needs K >= 16 (tiny test models have D = 8);
    the padding columns load as zeros and are never stored."""
    return max(16, triton.next_power_of_2(head_dim))


def kv_scale_args(q, k_scale, v_scale) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The scale pointers of an fp8 cache and the KV_SCALED flag; without scales, q twice
    as placeholder pointers that are never read."""
    if k_scale is None:
        return q, q, False
    return k_scale, v_scale, True


def check_paged_inputs(q, k_cache, v_cache, block_tables, seq_lens, k_scale=None, v_scale=None):
    """Shapes, dtypes, devices and strides the attention kernels rely on."""
    assert q.dim() == 3 and q.stride(-1) == 1, "q: (tokens, heads, head_dim), last dim dense"
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches: (blocks, bs, Hkv, D)"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache rows must be dense"
    assert k_cache.shape[3] == q.shape[2], "q and cache head_dim differ"
    assert q.shape[1] % k_cache.shape[2] == 0, "q heads must be a multiple of kv heads"
    assert q.dtype in (torch.float32, torch.float16, torch.bfloat16), q.dtype
    assert k_cache.dtype == v_cache.dtype, "the K and V caches must share a dtype"
    if k_cache.dtype == torch.float8_e4m3fn:
        check_kv_scales(k_cache, k_scale, v_scale)
    else:
        assert q.dtype == k_cache.dtype, "q and caches must share a dtype (or an fp8 cache)"
        assert k_scale is None and v_scale is None, "scales belong to an fp8 cache"
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2
    assert block_tables.stride(1) == 1, "block table rows must be dense"
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (block_tables.shape[0],)
    for t in (k_cache, v_cache, block_tables, seq_lens):
        assert t.device == q.device, "all inputs must sit on one device"


def check_kv_scales(cache, k_scale, v_scale) -> None:
    """An fp8 cache's scales: (Hkv,) fp32, dense, on the cache's device."""
    assert k_scale is not None and v_scale is not None, "an fp8 cache needs k and v scales"
    for scale in (k_scale, v_scale):
        assert scale.dtype == torch.float32 and scale.shape == (cache.shape[2],), "scales"
        assert scale.stride(0) == 1 and scale.device == cache.device


def attention_output(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """`out` checked against q (shape, dtype, device, dense head rows), or a new one."""
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, (
        f"out {tuple(out.shape)} {out.dtype} does not match q {tuple(q.shape)} {q.dtype}"
    )
    assert out.stride(2) == 1 and out.stride(1) == q.shape[2], "out's head rows must be dense"
    return out
