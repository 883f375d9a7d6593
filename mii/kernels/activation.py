"""SiLU-and-mul of the gated MLP: silu(gate) * up over x = [gate | up]."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, out_ptr, inner, stride_x, stride_out, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inner + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Rounded as torch rounds F.silu(gate) * up: silu to x's dtype first, then the product.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    out = (silu * up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + offs, out, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `torch_ref.silu_and_mul_ref`: x (..., 2I) -> (..., I)."""
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, "x: (..., 2I) with a dense last dim"
    inner = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    x2, out2 = x.reshape(-1, 2 * inner), out.view(-1, inner)  # (N, 2I), (N, I)
    if x2.shape[0] == 0 or inner == 0:
        return out
    grid = (x2.shape[0], triton.cdiv(inner, BLOCK))
    _silu_and_mul_kernel[grid](x2, out2, inner, x2.stride(0), out2.stride(0), BLOCK=BLOCK)
    return out
