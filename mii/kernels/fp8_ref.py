"""Torch references of the FP8 kernels: the contract of kernels/fp8_quant.py and
kernels/fp8_gemm.py, and the CPU path of FP8 linear layers.

Weights are float8 e4m3 (`torch.float8_e4m3fn`, largest value 448) with one float32 scale
per output channel: w ~= q * scale[:, None]. Activations of the W8A8 path are quantized per
token (row) the same way: x ~= q * scale[:, None], the scale taken from the row's absolute
maximum at run time. A linear layer then computes

    y[m, n] = sum_k x[m, k] * w[n, k] = scale_x[m] * scale_w[n] * sum_k qx[m, k] * qw[n, k]

with the sum in float32 (W8A8), or, keeping the activations as they are (weight-only, W8A16),
y[m, n] = scale_w[n] * sum_k x[m, k] * qw[n, k]. A third form scales activations per block
of K instead of per token (`fp8_block_w8a8_linear_ref`): the decode GEMM quantizes each tile
of x it loads.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
MIN_SCALE = 1e-12 / FP8_MAX  # an all-zero row keeps a finite scale (and quantizes to 0)


class QuantizedRows(NamedTuple):
    """Activations quantized per token already, as `quantize_rows` quantizes them, for a
    W8A8 GEMM: an FP8 linear layer takes them in place of x (kernels/rms_norm.py's
    `rms_norm(..., quantize=True)` makes them on the GPU)."""

    q: torch.Tensor
    """(M, K) float8_e4m3fn"""
    scale: torch.Tensor
    """(M,) float32"""
    dtype: torch.dtype
    """the unquantized activations' dtype, and the GEMM's output dtype"""


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> (q (N, K) float8_e4m3fn, scale (N,) float32): each row scaled so that its
    absolute maximum maps to 448. Per output channel for weights, per token for inputs."""
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(MIN_SCALE)  # (N,)
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q (N, K) float8 and scale (N,) -> (N, K) in `dtype`, the product taken in float32."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def fp8_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Weight-only: x (M, K) in its dtype, weight (N, K) float8, scale (N,) -> (M, N) in x's
    dtype. The weight is dequantized into x's dtype for this one call (the CPU path)."""
    return torch.nn.functional.linear(x, dequantize_rows(weight, scale, x.dtype), bias)


def fp8_w8a8_linear_ref(
    qx: torch.Tensor,
    x_scale: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8: qx (M, K) float8 with x_scale (M,), weight (N, K) float8 with w_scale (N,);
    the float8 products summed in float32, then scaled (what `torch._scaled_mm` computes)."""
    acc = qx.float() @ weight.float().t()  # (M, N), exact products of float8 values
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_block_w8a8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    block_k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """W8A8 with activation scales per (row, block of `block_k` columns): each block of x
    quantized as `quantize_rows` does a row, its float8 products with the weight's summed in
    float32 and scaled by its own scale; the total scaled by w_scale (N,). Out in x's dtype."""
    acc = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, x.shape[1], block_k):
        qx, x_scale = quantize_rows(x[:, start : start + block_k])
        part = qx.float() @ weight[:, start : start + block_k].float().t()
        acc += part * x_scale[:, None]
    y = acc * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
