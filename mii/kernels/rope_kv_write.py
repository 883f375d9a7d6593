"""Rotary embedding of q and k (in place) fused with the write of k and v into the paged
KV cache: one program per token reads its q, k and v once. With partial rotary (Phi-2,
Phi-4-mini) the first ROT_HALF * 2 dims of each head turn and the rest pass through.
An fp8 cache (QUANTIZE) stores each head's x / scale, clamped to +-FP8_MAX (torch_ref)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.attention_tiles import check_kv_scales
from mii.kernels.pdl import enter, pdl_args
from mii.kernels.torch_ref import FP8_DTYPE

FP8_MAX: tl.constexpr = tl.constexpr(448.0)  # torch_ref.FP8_MAX, e4m3's largest finite


@triton.jit
def _to_cache(x, cache_ptr, scale_ptr, offs_h, num_heads, QUANTIZE: tl.constexpr):
    """(BLOCK_H, W) values of one token's heads as the cache stores them."""
    if QUANTIZE:
        scale = tl.load(scale_ptr + offs_h, mask=offs_h < num_heads, other=1.0)
        x, scale = tl.broadcast(x.to(tl.float32), scale[:, None])  # div_rn won't broadcast
        x = tl.math.div_rn(x, scale)  # IEEE division, as torch divides
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
    return x.to(cache_ptr.dtype.element_ty)


@triton.jit
def _rotate_heads(
    ptr, stride_tok, stride_head, token, cos, sin, num_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):  # fmt: skip
    """Rotate one token's heads in place (their first 2 * HALF dims, as two halves).
    Returns the rotated halves in the tensor's dtype, as stored."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    ptrs = ptr + token * stride_tok + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(ptrs, mask=mask, other=0.0)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    x1 = (a * cos[None, :] - b * sin[None, :]).to(x1.dtype)
    x2 = (b * cos[None, :] + a * sin[None, :]).to(x2.dtype)
    tl.store(ptrs, x1, mask=mask)
    tl.store(ptrs + HALF, x2, mask=mask)
    return x1, x2


@triton.jit
def _store_slot(
    cache_ptr, block, offset, stride_block, stride_slot, stride_head, x1, x2, num_heads,
    scale_ptr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
    QUANTIZE: tl.constexpr,
):  # fmt: skip
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < HALF)
    base = cache_ptr + block * stride_block + offset * stride_slot
    ptrs = base + offs_h[:, None] * stride_head + offs_d[None, :]
    tl.store(ptrs, _to_cache(x1, cache_ptr, scale_ptr, offs_h, num_heads, QUANTIZE), mask=mask)
    x2 = _to_cache(x2, cache_ptr, scale_ptr, offs_h, num_heads, QUANTIZE)
    tl.store(ptrs + HALF, x2, mask=mask)


@triton.jit
def _copy_to_slot(
    ptr, stride_tok, stride_head, token, cache_ptr, block, offset, stride_block, stride_slot,
    stride_cache_head, num_heads, scale_ptr,
    START: tl.constexpr, WIDTH: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr,
    QUANTIZE: tl.constexpr,
):  # fmt: skip
    """Copy dims [START, START + WIDTH) of one token's heads into its cache slot."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = START + tl.arange(0, BLOCK_W)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < START + WIDTH)
    x = tl.load(
        ptr + token * stride_tok + offs_h[:, None] * stride_head + offs_d[None, :],
        mask=mask, other=0.0,
    )  # fmt: skip
    base = cache_ptr + block * stride_block + offset * stride_slot
    ptrs = base + offs_h[:, None] * stride_cache_head + offs_d[None, :]
    tl.store(ptrs, _to_cache(x, cache_ptr, scale_ptr, offs_h, num_heads, QUANTIZE), mask=mask)


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
    enter(PDL)
    token = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    if ROTATE:
        row = cos_sin_ptr + tl.load(positions_ptr + token).to(tl.int64) * stride_cos_sin
        cos = tl.load(row + offs_d, mask=offs_d < ROT_HALF, other=0.0).to(tl.float32)
        sin = tl.load(row + ROT_HALF + offs_d, mask=offs_d < ROT_HALF, other=0.0).to(tl.float32)
        _rotate_heads(
            q_ptr, stride_q_tok, stride_q_head, token, cos, sin, q_heads,
            ROT_HALF, BLOCK_HQ, BLOCK_HALF,
        )  # fmt: skip
        k1, k2 = _rotate_heads(
            k_ptr, stride_k_tok, stride_k_head, token, cos, sin, kv_heads,
            ROT_HALF, BLOCK_HKV, BLOCK_HALF,
        )  # fmt: skip
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot >= 0:  # negative slots are padding rows: rotate, but write nothing
        block, offset = slot // BLOCK_SIZE, slot % BLOCK_SIZE
        if ROTATE:
            _store_slot(
                k_cache_ptr, block, offset, stride_kc_block, stride_kc_slot, stride_kc_head,
                k1, k2, kv_heads, k_scale_ptr, ROT_HALF, BLOCK_HKV, BLOCK_HALF, QUANTIZE,
            )  # fmt: skip
            if 2 * ROT_HALF < HEAD_DIM:  # the dims past the rotary ones, as they are
                _copy_to_slot(
                    k_ptr, stride_k_tok, stride_k_head, token, k_cache_ptr, block, offset,
                    stride_kc_block, stride_kc_slot, stride_kc_head, kv_heads, k_scale_ptr,
                    2 * ROT_HALF, HEAD_DIM - 2 * ROT_HALF, BLOCK_HKV, BLOCK_TAIL, QUANTIZE,
                )  # fmt: skip
        else:
            _copy_to_slot(
                k_ptr, stride_k_tok, stride_k_head, token, k_cache_ptr, block, offset,
                stride_kc_block, stride_kc_slot, stride_kc_head, kv_heads, k_scale_ptr,
                0, HEAD_DIM, BLOCK_HKV, BLOCK_D, QUANTIZE,
            )  # fmt: skip
        _copy_to_slot(
            v_ptr, stride_v_tok, stride_v_head, token, v_cache_ptr, block, offset,
            stride_vc_block, stride_vc_slot, stride_vc_head, kv_heads, v_scale_ptr,
            0, HEAD_DIM, BLOCK_HKV, BLOCK_D, QUANTIZE,
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
