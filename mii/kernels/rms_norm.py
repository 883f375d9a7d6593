"""Residual add fused with RMSNorm: one program per row, the row held in registers.

`rms_norm(..., quantize=True)` ends in the per-token FP8 quantization of an FP8 linear
layer's W8A8 GEMM instead of the normed row (`fp8_quant.quantize_rows(rms_norm(...)[0])`:
the row is rounded to the normed output's dtype first; the same bits in the interpreter,
and on sm_90 a rare element one code apart (most likely the two compiles' row sums differ in
their last bit)). In a 4,096-token step of the Mistral-7B shape that saves writing and
reading back two (4096, 4096) activations a layer, and the quantization's launches."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels import fp8_ref
from mii.kernels.fp8_quant import quantized_outputs, store_quantized
from mii.kernels.fp8_ref import QuantizedRows
from mii.kernels.pdl import pdl_args, release_next, wait_prior
from mii.kernels.split_k import split_constants, split_sums
from mii.kernels.torch_ref import SplitSums

FP8_MAX = tl.constexpr(fp8_ref.FP8_MAX)
MIN_SCALE = tl.constexpr(fp8_ref.MIN_SCALE)
# the normed rows' dtype by name (a string constexpr, as DOT_PRECISION is elsewhere)
ROUNDING = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr, scale_ptr,
    x_scale_ptr, x_bias_ptr, rows,
    hidden, eps, stride_x, stride_residual, stride_out, stride_new_residual,
    HAS_RESIDUAL: tl.constexpr, UNIT_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
    QUANTIZE: tl.constexpr, ROUND_TO: tl.constexpr, X_SPLITS: tl.constexpr,
    X_SCALED: tl.constexpr, X_BIAS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """QUANTIZE: out_ptr takes the row quantized to float8 and scale_ptr its scale, after
    rounding to ROUND_TO (`ROUNDING`: the dtype the normed row has unquantized). X_SPLITS:
    x is a GEMV's `SplitSums` (x_ptr its partials, x_scale_ptr and x_bias_ptr its
    constants), added up here and stored at new_residual_ptr (with the residual, if any)."""
    release_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    # The weight first: no kernel writes it, so it loads before the wait (PDL). Loaded
    # after the residual's store, as before, it was issued only once x had arrived (the
    # compiler keeps a load behind a store that may alias): a second round trip to memory.
    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
    if X_SPLITS:
        x_scale, x_bias = split_constants(x_scale_ptr, x_bias_ptr, offs, mask, X_SCALED, X_BIAS)
    wait_prior(PDL)
    if X_SPLITS:
        x = split_sums(x_ptr, x_scale, x_bias, row, offs, mask, rows, hidden, X_SPLITS, X_SCALED,
                       X_BIAS).to(new_residual_ptr.dtype.element_ty)  # fmt: skip
    else:
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        x = add_rounded(x, r)
    if HAS_RESIDUAL or X_SPLITS:
        tl.store(new_residual_ptr + row * stride_new_residual + offs, x, mask=mask)
    out = normalized(x, w, hidden, eps, UNIT_OFFSET)
    if QUANTIZE:
        if ROUND_TO == "bf16":
            out = out.to(tl.bfloat16).to(tl.float32)
        elif ROUND_TO == "fp16":
            out = out.to(tl.float16).to(tl.float32)
        store_quantized(out, out_ptr + row * stride_out, scale_ptr + row, offs, mask, FP8_MAX,
                        MIN_SCALE)  # fmt: skip
    else:
        tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_rounded(x, r):
    """x + r in float32, rounded to x's dtype as torch's x + r."""
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def normalized(x, w, hidden, eps, UNIT_OFFSET: tl.constexpr):
    """One row x (its dtype; 0 past `hidden`) RMS-normalised and scaled by the weight w
    (loaded by the caller, 0 past `hidden`), in float32 (the caller rounds it to the
    output's dtype)."""
    h = x.to(tl.float32)
    inv_rms = tl.math.rsqrt(tl.sum(h * h, 0) / hidden + eps)
    w = w.to(tl.float32)
    if UNIT_OFFSET:  # noqa: SIM108 (a static if) Gemma: (1 + w) in fp32, one rounding
        out = h * inv_rms * (1.0 + w)
    else:
        out = w * (h * inv_rms).to(x.dtype).to(tl.float32)  # HF llama rounds before the weight
    return out


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., H) -> (N, H) with dense rows (a view when possible)."""
    assert t.stride(-1) == 1, "the hidden dim must be dense"
    return t.reshape(-1, t.shape[-1])  # (N, H)


def rms_norm(
    x: torch.Tensor | SplitSums,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
    quantize: bool = False,
) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
    """Triton version of `torch_ref.rms_norm_ref`: (weight * norm(x + residual),
    x + residual); without a residual the second result is x itself. `unit_offset`:
    Gemma's (1 + weight) scale, the result in x's dtype. `quantize`: the normed rows come
    quantized per token for a W8A8 GEMM, as (N, H) `QuantizedRows`: `fp8_quant.quantize_rows`
    of the unquantized result (see the module's note on its bits). x may be a GEMV's
    `SplitSums` (2-D), added up as it loads; the second result is then a new tensor."""
    splits = x if isinstance(x, SplitSums) else None
    shape, dtype = (splits.shape, splits.dtype) if splits else (x.shape, x.dtype)
    device = splits.partials.device if splits else x.device
    hidden = shape[-1]
    assert weight.shape == (hidden,) and weight.stride(0) == 1
    assert weight.device == device
    if residual is not None:
        assert residual.shape == shape and residual.dtype == dtype
        assert residual.device == device
    # as torch's weight * normed; Gemma casts back to x's dtype
    out_dtype = dtype if unit_offset else torch.promote_types(weight.dtype, dtype)
    fresh = residual is not None or splits is not None
    new_residual = torch.empty(shape, dtype=dtype, device=device) if fresh else x
    x2 = splits.partials if splits else _rows(x)  # (N, H); partials (S, N, H)
    new2 = _rows(new_residual)
    res2 = new2 if residual is None else _rows(residual)  # read only with a residual
    if quantize:
        out2, scale = quantized_outputs(new2.shape[0], hidden, device)
        out = QuantizedRows(out2, scale, out_dtype)
    else:
        out = torch.empty(shape, dtype=out_dtype, device=device)
        out2 = scale = out.view(-1, hidden)  # scale: a placeholder, never written
    rows = new2.shape[0]
    if rows == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    x_scale = x_bias = weight  # placeholders unless x is SplitSums with them
    if splits and splits.scale is not None:
        x_scale = splits.scale
    if splits and splits.bias is not None:
        x_bias = splits.bias
    _rms_norm_kernel[(rows,)](
        x2, res2, weight, out2, new2, scale, x_scale, x_bias, rows, hidden, eps,
        x2.stride(-2), res2.stride(0), out2.stride(0), new2.stride(0),
        HAS_RESIDUAL=residual is not None, UNIT_OFFSET=unit_offset, BLOCK=block,
        QUANTIZE=quantize, ROUND_TO=ROUNDING[out_dtype],
        X_SPLITS=splits.partials.shape[0] if splits else 0,
        X_SCALED=bool(splits) and splits.scale is not None,
        X_BIAS=bool(splits) and splits.bias is not None,
        num_warps=min(16, max(1, block // 512)), **pdl_args(new2),
    )  # fmt: skip
    return out, new_residual
