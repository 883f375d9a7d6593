"""Rotary embedding of q and k (in place) fused with the write of k and v into the paged
KV cache: one program per token reads its q, k and v once. With partial rotary (Phi-2,
Phi-4-mini) the first ROT_HALF * 2 dims of each head turn and the rest pass through.
An fp8 cache (QUANTIZE) stores each head's x / scale, clamped to +-FP8_MAX (torch_ref)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.attention_tiles import check_kv_scales
from mii.kernels.pdl import pdl_args, release_next, wait_prior
from mii.kernels.torch_ref import FP8_DTYPE

FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # torch_ref.FP8_MAX, e4m3's largest finite


@triton.jit
def _to_cache(x, cache_ptr, scale, QUANTIZE: tl.constexpr):
    """(BLOCK_H, W) values of one token's heads as the cache stores them; `scale`: the
    heads' (BLOCK_H,) scales of an fp8 cache (QUANTIZE)."""
    if QUANTIZE:
        x, scale = tl.broadcast(x.to(tl.float32), scale[:, None])  # div_rn won't broadcast
        x = tl.math.div_rn(x, scale)  # IEEE division, as torch divides
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _head_scales(scale_ptr, num_heads, BLOCK_H: tl.constexpr, QUANTIZE: tl.constexpr):
    """An fp8 cache's (BLOCK_H,) per-head scales (1 past num_heads); 1.0 for any other."""
    scale = 1.0
    if QUANTIZE:
        offs_h = tl.arange(0, BLOCK_H)
        scale = tl.load(scale_ptr + offs_h, mask=offs_h < num_heads, other=1.0)
    return scale


@triton.jit
def _head_ptrs(
    ptr, stride_tok, stride_head, token, num_heads,
    START: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
):  # fmt: skip
    """Pointers (BLOCK_H, BLOCK_W) to dims [START, START + WIDTH) of one token's heads, and
    their mask. A cache slot's too: ptr at its block, the slot's stride and offset for the
    token's."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = START + tl.arange(0, BLOCK_W)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < START + WIDTH)
    return ptr + token * stride_tok + offs_h[:, None] * stride_head + offs_d[None, :], mask


@triton.jit
def _rotated(x1, x2, cos, sin):
    """The two halves of heads (BLOCK_H, BLOCK_HALF) turned by the token's angles, in
    float32 and rounded back to their dtype."""
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    y1 = a * cos[None, :] - b * sin[None, :]
    y2 = b * cos[None, :] + a * sin[None, :]
    return y1.to(x1.dtype), y2.to(x2.dtype)


@triton.jit
def _to_slot(
    x, cache_ptr, block, offset, stride_block, stride_slot, stride_head, num_heads, scale,
    START: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    QUANTIZE: tl.constexpr,
):  # fmt: skip
    """Store dims [START, START + WIDTH) of one token's heads (x) into its cache slot."""
    ptrs, mask = _head_ptrs(
        cache_ptr + block * stride_block, stride_slot, stride_head, offset, num_heads,
        START, WIDTH, BLOCK_H, BLOCK_W,
    )  # fmt: skip
    tl.store(ptrs, _to_cache(x, cache_ptr, scale, QUANTIZE), mask=mask)


@triton.jit
def _rope_kv_write_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    k_scale_ptr, v_scale_ptr, q_heads, kv_heads,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cos_sin,
    stride_kc_block, stride_kc_slot, stride_kc_head,
    stride_vc_block, stride_vc_slot, stride_vc_head,
    HEAD_DIM: tl.constexpr, ROT_HALF: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr, ROTATE: tl.constexpr,
    QUANTIZE: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """One program per token. Every load comes before the first store: the compiler keeps
    a load behind a store that may alias (q, k and v are views of one projection), so a
    load after a store waits for the data that store needed; at a decode step's one token
    those round trips to memory are the kernel's time. The token's position, its angles and
    its slot load before the PDL wait (the step's inputs and a constant table: kernels/pdl.py),
    so after it only q, k and v are a round trip away."""
    release_next(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    k_scale = _head_scales(k_scale_ptr, kv_heads, BLOCK_HKV, QUANTIZE)
    v_scale = _head_scales(v_scale_ptr, kv_heads, BLOCK_HKV, QUANTIZE)
    if ROTATE:
        row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cos_sin
        offs_d = tl.arange(0, BLOCK_HALF)
        cos = tl.load(row + offs_d, mask=offs_d < ROT_HALF, other=0.0).to(tl.float32)
        sin = tl.load(row + ROT_HALF + offs_d, mask=offs_d < ROT_HALF, other=0.0).to(tl.float32)
    wait_prior(PDL)
    v_ptrs, v_mask = _head_ptrs(
        v_ptr, stride_v_tok, stride_v_head, token, kv_heads, 0, HEAD_DIM, BLOCK_HKV, BLOCK_D
    )
    v = tl.load(v_ptrs, mask=v_mask, other=0.0)
    if ROTATE:
        q_ptrs, q_mask = _head_ptrs(
            q_ptr, stride_q_tok, stride_q_head, token, q_heads, 0, ROT_HALF, BLOCK_HQ, BLOCK_HALF
        )
        k_ptrs, k_mask = _head_ptrs(
            k_ptr, stride_k_tok, stride_k_head, token, kv_heads, 0, ROT_HALF, BLOCK_HKV,
            BLOCK_HALF,
        )  # fmt: skip
        q1 = tl.load(q_ptrs, mask=q_mask, other=0.0)
        q2 = tl.load(q_ptrs + ROT_HALF, mask=q_mask, other=0.0)
        k1 = tl.load(k_ptrs, mask=k_mask, other=0.0)
        k2 = tl.load(k_ptrs + ROT_HALF, mask=k_mask, other=0.0)
        if 2 * ROT_HALF < HEAD_DIM:  # partial rotary: the dims past the rotary ones, as they are
            tail_ptrs, tail_mask = _head_ptrs(
                k_ptr, stride_k_tok, stride_k_head, token, kv_heads, 2 * ROT_HALF,
                HEAD_DIM - 2 * ROT_HALF, BLOCK_HKV, BLOCK_TAIL,
            )  # fmt: skip
            k_tail = tl.load(tail_ptrs, mask=tail_mask, other=0.0)
        q1, q2 = _rotated(q1, q2, cos, sin)
        k1, k2 = _rotated(k1, k2, cos, sin)
        tl.store(q_ptrs, q1, mask=q_mask)  # q and k turn in place
        tl.store(q_ptrs + ROT_HALF, q2, mask=q_mask)
        tl.store(k_ptrs, k1, mask=k_mask)
        tl.store(k_ptrs + ROT_HALF, k2, mask=k_mask)
    else:
        k_ptrs, k_mask = _head_ptrs(
            k_ptr, stride_k_tok, stride_k_head, token, kv_heads, 0, HEAD_DIM, BLOCK_HKV, BLOCK_D
        )
        k = tl.load(k_ptrs, mask=k_mask, other=0.0)
    if slot >= 0:  # negative slots are padding rows: rotate, but write nothing
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        if ROTATE:
            _to_slot(
                k1, k_cache_ptr, block, offset, stride_kc_block, stride_kc_slot,
                stride_kc_head, kv_heads, k_scale, 0, ROT_HALF, BLOCK_HKV, BLOCK_HALF, QUANTIZE,
            )  # fmt: skip
            _to_slot(
                k2, k_cache_ptr, block, offset, stride_kc_block, stride_kc_slot,
                stride_kc_head, kv_heads, k_scale, ROT_HALF, ROT_HALF, BLOCK_HKV, BLOCK_HALF,
                QUANTIZE,
            )  # fmt: skip
            if 2 * ROT_HALF < HEAD_DIM:
                _to_slot(
                    k_tail, k_cache_ptr, block, offset, stride_kc_block, stride_kc_slot,
                    stride_kc_head, kv_heads, k_scale, 2 * ROT_HALF, HEAD_DIM - 2 * ROT_HALF,
                    BLOCK_HKV, BLOCK_TAIL, QUANTIZE,
                )  # fmt: skip
        else:
            _to_slot(
                k, k_cache_ptr, block, offset, stride_kc_block, stride_kc_slot, stride_kc_head,
                kv_heads, k_scale, 0, HEAD_DIM, BLOCK_HKV, BLOCK_D, QUANTIZE,
            )  # fmt: skip
        _to_slot(
            v, v_cache_ptr, block, offset, stride_vc_block, stride_vc_slot, stride_vc_head,
            kv_heads, v_scale, 0, HEAD_DIM, BLOCK_HKV, BLOCK_D, QUANTIZE,
        )  # fmt: skip


def _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping) -> None:
    """Everything but the scales (see `rope_kv_write`)."""
    tokens, _, dim = q.shape
    assert k.dim() == 3 and k.shape == v.shape and k.shape[0] == tokens and k.shape[2] == dim
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape
    assert k_cache.shape[2:] == k.shape[1:], "cache (blocks, bs, Hkv, D) must match k"
    for t in (q, k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "head_dim must be dense"
    assert dim % 2 == 0
    assert positions.shape == (tokens,) and slot_mapping.shape == (tokens,)
    assert not positions.is_floating_point() and not slot_mapping.is_floating_point()
    if cos_sin_cache is not None:
        width = cos_sin_cache.shape[1]
        assert cos_sin_cache.dim() == 2 and width <= dim and width % 2 == 0, "rotary width"
        assert cos_sin_cache.stride(1) == 1
    tensors = (k, v, positions, k_cache, v_cache, slot_mapping, cos_sin_cache)
    assert all(t.device == q.device for t in tensors if t is not None), "one device"


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Triton version of `torch_ref.rope_kv_write_ref`. q, k and v may be strided views
    (e.g. of one fused qkv projection) as long as each head's vector is dense. An fp8
    cache takes its (Hkv,) fp32 `k_scale` and `v_scale`."""
    _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)
    quantize = k_cache.dtype == FP8_DTYPE
    if quantize:
        check_kv_scales(k_cache, k_scale, v_scale)
    else:
        assert k_scale is None and v_scale is None, "scales belong to an fp8 cache"
        k_scale = v_scale = q  # never read: placeholder pointers
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return
    rotate = cos_sin_cache is not None
    cos_sin = cos_sin_cache if rotate else q  # never read: a placeholder pointer
    rot_half = cos_sin_cache.shape[1] // 2 if rotate else dim // 2
    tail = max(1, dim - 2 * rot_half)
    _rope_kv_write_kernel[(tokens,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale, v_scale,
        q_heads, kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        HEAD_DIM=dim, ROT_HALF=rot_half, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_HQ=triton.next_power_of_2(q_heads), BLOCK_HKV=triton.next_power_of_2(kv_heads),
        BLOCK_HALF=triton.next_power_of_2(rot_half), BLOCK_D=triton.next_power_of_2(dim),
        BLOCK_TAIL=triton.next_power_of_2(tail), ROTATE=rotate, QUANTIZE=quantize,
        num_warps=4, **pdl_args(q),
    )  # fmt: skip
