"""Dynamic per-token FP8 quantization of activations (`fp8_ref.quantize_rows` on rows of x):
one program per row, the row held in registers between its absolute maximum and its cast.

`act_and_mul_quantize_rows` is a gated MLP's activation and that quantization in one pass:
the down projection's float8 input straight from [gate | up], the same bits as
`quantize_rows(act_and_mul(x))` (the activation rounded to x's dtype first, as its kernel
stores it). In a 4,096-token step of the Mistral-7B shape that saves writing and reading
back the (4096, 14336) activation: 235 MB of a layer's 470 MB through those two kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.activation import act_and_mul
from mii.kernels.fp8_ref import FP8, FP8_MAX, MIN_SCALE

MAX_ROW = 1 << 16  # elements a program holds in registers


def quantized_outputs(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Empty (rows, cols) float8 values and (rows,) float32 scales, for a kernel that
    quantizes rows of `cols` elements (at most MAX_ROW) held in registers."""
    assert cols <= MAX_ROW, f"rows of {cols} elements exceed {MAX_ROW}"
    q = torch.empty((rows, cols), dtype=FP8, device=device)
    return q, torch.empty(rows, dtype=torch.float32, device=device)


@triton.jit
def store_quantized(x, q_row_ptr, scale_ptr, offs, mask, FP8_MAX: tl.constexpr,
                    MIN_SCALE: tl.constexpr):  # fmt: skip
    """One float32 row (masked lanes 0) quantized by its absolute maximum, and its scale."""
    scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_row_ptr + offs, q.to(q_row_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr, scale)


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, cols, stride_x, stride_q,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    store_quantized(x, q_ptr + row * stride_q, scale_ptr + row, offs, mask, FP8_MAX, MIN_SCALE)


@triton.jit
def _act_and_mul_quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, inner, stride_x, stride_q,
    GELU: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < inner
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inner + offs, mask=mask, other=0.0)
    h = act_and_mul(gate, up, GELU).to(tl.float32)  # rounded to x's dtype, as stored
    store_quantized(h, q_ptr + row * stride_q, scale_ptr + row, offs, mask, FP8_MAX, MIN_SCALE)


def _quantize(kernel, x: torch.Tensor, cols: int, **constexprs) -> tuple[torch.Tensor, ...]:
    """One program per row of x: `cols` quantized values a row and the row's scale."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (M, K) with dense rows"
    q, scale = quantized_outputs(x.shape[0], cols, x.device)
    if x.shape[0] == 0:
        return q, scale
    block = triton.next_power_of_2(cols)
    kernel[(x.shape[0],)](
        x, q, scale, cols, x.stride(0), q.stride(0), FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE,
        BLOCK=block, num_warps=min(16, max(1, block // 512)), **constexprs,
    )  # fmt: skip
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `fp8_ref.quantize_rows`: x (M, K) -> (q (M, K) float8_e4m3fn,
    scale (M,) float32)."""
    return _quantize(_quantize_rows_kernel, x, x.shape[1])


def act_and_mul_quantize_rows(x: torch.Tensor, gelu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, 2I) = [gate | up] in bf16/fp16 -> `quantize_rows` of silu(gate) * up (gelu_tanh
    with `gelu`) rounded to x's dtype: (q (M, I) float8_e4m3fn, scale (M,) float32)."""
    assert x.shape[-1] % 2 == 0, "x: (M, 2I) = [gate | up]"
    return _quantize(_act_and_mul_quantize_rows_kernel, x, x.shape[-1] // 2, GELU=gelu)
