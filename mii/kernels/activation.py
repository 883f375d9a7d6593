"""The gated MLP's activation over x = [gate | up]: silu(gate) * up (SwiGLU, llama) or
gelu_tanh(gate) * up (GeGLU, Gemma)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.jit_math import tanh

BLOCK = 1024


@triton.jit
def act_and_mul(gate, up, GELU: tl.constexpr):
    """silu(gate) * up, or gelu_tanh(gate) * up, in float32 and rounded as torch rounds:
    the activation to gate's dtype, then the product; returned in gate's dtype. The GEMV of
    kernels/gemv.py calls it on the down projection's input (its `gated` argument)."""
    g = gate.to(tl.float32)
    if GELU:
        inner_arg = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) * (...)
        act = 0.5 * g * (1.0 + tanh(inner_arg))
    else:
        act = g / (1.0 + tl.exp(-g))
    return (act.to(gate.dtype).to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _act_and_mul_kernel(
    x_ptr, out_ptr, inner, stride_x, stride_out, GELU: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inner
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inner + offs, mask=mask, other=0.0)
    out = act_and_mul(gate, up, GELU)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `torch_ref.silu_and_mul_ref`: x (..., 2I) -> (..., I)."""
    return _act_and_mul(x, gelu=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `torch_ref.gelu_tanh_and_mul_ref`: x (..., 2I) -> (..., I)."""
    return _act_and_mul(x, gelu=True)


def _act_and_mul(x: torch.Tensor, gelu: bool) -> torch.Tensor:
    assert x.shape[-1] % 2 == 0 and x.stride(-1) == 1, "x: (..., 2I) with a dense last dim"
    inner = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    x2, out2 = x.reshape(-1, 2 * inner), out.view(-1, inner)  # (N, 2I), (N, I)
    if x2.shape[0] == 0 or inner == 0:
        return out
    grid = (x2.shape[0], triton.cdiv(inner, BLOCK))
    _act_and_mul_kernel[grid](x2, out2, inner, x2.stride(0), out2.stride(0), GELU=gelu, BLOCK=BLOCK)
    return out
