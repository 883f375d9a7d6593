"""Dynamic per-token FP8 quantization of activations (`fp8_ref.quantize_rows` on rows of x):
one program per row, the row held in registers between its absolute maximum and its cast."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.fp8_ref import FP8, FP8_MAX, MIN_SCALE

MAX_ROW = 1 << 16  # elements a program holds in registers


@triton.jit
def _quantize_rows_kernel(
    x_ptr, q_ptr, scale_ptr, cols, stride_x, stride_q,
    FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < cols
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / FP8_MAX, MIN_SCALE)
    q = tl.clamp(x / scale, -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * stride_q + offs, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `fp8_ref.quantize_rows`: x (M, K) -> (q (M, K) float8_e4m3fn,
    scale (M,) float32)."""
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (M, K) with dense rows"
    rows, cols = x.shape
    assert cols <= MAX_ROW, f"rows of {cols} elements exceed {MAX_ROW}"
    q = torch.empty((rows, cols), dtype=FP8, device=x.device)
    scale = torch.empty(rows, dtype=torch.float32, device=x.device)
    if rows == 0:
        return q, scale
    block = triton.next_power_of_2(cols)
    _quantize_rows_kernel[(rows,)](
        x, q, scale, cols, x.stride(0), q.stride(0),
        FP8_MAX=FP8_MAX, MIN_SCALE=MIN_SCALE, BLOCK=block,
        num_warps=min(16, max(1, block // 512)),
    )  # fmt: skip
    return q, scale
