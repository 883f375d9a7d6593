"""FP8-weight GEMMs and per-token activation quantization against kernels/fp8_ref.py.

The interpreter loads, converts and multiplies float8 correctly, so both GEMM modes run
there; its float32 -> float8 cast is not correct (it rounds 124.3 to 64, not 128), so the
quantization kernel's values are checked on the GPU only (its scales on both)."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels.fp8_ref import (
    fp8_block_w8a8_linear_ref,
    fp8_linear_ref,
    fp8_w8a8_linear_ref,
    quantize_rows,
)

# (M, N, K): decode and prefill rows; N and K off the tile sizes (masks, EVEN_K off)
SHAPES = [(1, 96, 256), (5, 80, 160), (16, 64, 512), (33, 128, 96), (130, 48, 320)]
BACKENDS = ("triton", "triton_w8a8", "triton_w8a8_block", "scaled_mm", "scaled_mm_fast_accum")
GPU_SHAPES = [(1, 6144, 4096), (16, 4096, 4096), (64, 28672, 4096), (300, 4096, 14336),
              (4096, 512, 4096), (7, 200, 136)]  # fmt: skip


def _operands(m, n, k, device, dtype, bias=True):
    gen = torch.Generator().manual_seed(m * 7 + n)
    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 0.05
    q, scale = quantize_rows(w.to(device))
    b = torch.randn(n, generator=gen).to(device=device, dtype=dtype) if bias else None
    return x, q, scale, b


def _check_weight_only(gemm, m, n, k, device, dtype, bias=True):
    x, q, scale, b = _operands(m, n, k, device, dtype, bias)
    expected = fp8_linear_ref(x.float(), q, scale, None if b is None else b.float())
    with poisoned_allocations():
        out = gemm.fp8_gemm(x, q, scale, b)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, expected) < max(TOLERANCE[dtype], 2e-3 if device == "cuda" else 0)


def _check_w8a8(gemm, m, n, k, device, out_dtype):
    x, q, scale, b = _operands(m, n, k, device, torch.float32)
    qx, x_scale = quantize_rows(x)
    expected = fp8_w8a8_linear_ref(qx, x_scale, q, scale, torch.float32, b)
    with poisoned_allocations():
        out = gemm.fp8_gemm(qx, q, scale, b.to(out_dtype), a_scale=x_scale, out_dtype=out_dtype)
    assert out.dtype == out_dtype
    assert rel_err(out, expected) < max(TOLERANCE[out_dtype], 1e-5)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_weight_only_matches_reference_interpreted(interpreted, shape, dtype):
    _check_weight_only(interpreted.fp8_gemm, *shape, "cpu", dtype, bias=shape[0] % 2 == 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", SHAPES)
def test_w8a8_matches_reference_interpreted(interpreted, shape):
    _check_w8a8(interpreted.fp8_gemm, *shape, "cpu", torch.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("split_k", [2, 3])
@pytest.mark.parametrize("a_fp8", [False, True])
def test_split_k_matches_reference_interpreted(interpreted, split_k, a_fp8):
    tile = interpreted.fp8_gemm.Fp8Tile(16, 16, 64, 4, 2, split_k=split_k)
    x, q, scale, b = _operands(5, 80, 1000, "cpu", torch.float32)  # 16 K tiles, 3 splits
    if a_fp8:
        qx, x_scale = quantize_rows(x)
        expected = fp8_w8a8_linear_ref(qx, x_scale, q, scale, torch.float32, b)
        out = interpreted.fp8_gemm.fp8_gemm(
            qx, q, scale, b, a_scale=x_scale, out_dtype=torch.float16, tile=tile
        )
        assert out.dtype == torch.float16 and rel_err(out, expected) < TOLERANCE[out.dtype]
    else:
        out = interpreted.fp8_gemm.fp8_gemm(x, q, scale, b, tile=tile)
        assert rel_err(out, fp8_linear_ref(x, q, scale, b)) < TOLERANCE[torch.float32]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_block_quantized_activations_interpreted(interpreted, shape, split_k):
    """In-kernel quantization of x per (row, K tile). The interpreter's float8 cast rounds
    badly (module docstring), so values are checked within 10% of the exact product here: a
    scale applied twice, not at all or to the wrong rows misses by far more; the GPU test
    holds them to the reference."""
    m, n, k = shape
    tile = interpreted.fp8_gemm.Fp8Tile(16, 16, 64, 4, 2, split_k=split_k)
    x, q, scale, b = _operands(m, n, k, "cpu", torch.float32)
    x[0] *= 100  # one row far larger: its scale must stay its own
    out = interpreted.fp8_gemm.fp8_gemm(x, q, scale, b, tile=tile, a_block_quant=True)
    assert out.shape == (m, n) and out.dtype == torch.float32
    exact = fp8_linear_ref(x, q, scale, b)
    for row in range(m):
        assert rel_err(out[row], exact[row]) < 0.1, row


def test_quantize_scales_interpreted(interpreted):
    x = torch.randn(9, 700) * torch.logspace(-2, 2, 9)[:, None]
    x[3] = 0
    q, scale = interpreted.fp8_quant.quantize_rows(x)
    assert torch.equal(scale, quantize_rows(x)[1])
    assert q.dtype == torch.float8_e4m3fn and not q.float()[3].any()


def _check_activation_then_quantization(kernels, device, gelu, dtype, rows, inner):
    """`act_and_mul_quantize_rows` gives the bits of the activation kernel then the
    quantization kernel (the interpreter's cast is wrong, but the same in both)."""
    gen = torch.Generator().manual_seed(rows + inner)
    x = (torch.randn(rows, 2 * inner, generator=gen) * 3).to(device=device, dtype=dtype)
    x[min(1, rows - 1)] = 0  # an all-zero row: the least scale, zeros
    act = kernels.activation.gelu_tanh_and_mul if gelu else kernels.activation.silu_and_mul
    want_q, want_scale = kernels.fp8_quant.quantize_rows(act(x))
    with poisoned_allocations():
        q, scale = kernels.fp8_quant.act_and_mul_quantize_rows(x, gelu)
    assert q.shape == (rows, inner) and q.dtype == torch.float8_e4m3fn
    assert torch.equal(scale, want_scale)
    assert torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def _check_gated_linear(kernels, device, dtype, m, n, k, backend, gated):
    """fp8_linear over [gate | up] with `gated`: the bits of the activation, then the GEMM."""
    x, q, scale, b = _operands(m, n, 2 * k, device, dtype)
    act = kernels.activation.gelu_tanh_and_mul if gated == "gelu_tanh" else (
        kernels.activation.silu_and_mul)  # fmt: skip
    w, w_scale = q[:, :k].contiguous(), scale
    want = kernels.fp8_gemm.fp8_linear(act(x), w, w_scale, b, backend=backend)
    out = kernels.fp8_gemm.fp8_linear(x, w, w_scale, b, backend=backend, gated=gated)
    assert out.shape == (m, n) and torch.equal(out, want)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows", [1, 5])
def test_activation_and_quantization_in_one_pass_interpreted(interpreted, gelu, dtype, rows):
    _check_activation_then_quantization(interpreted, "cpu", gelu, dtype, rows, 300)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["triton", "triton_w8a8"])
@pytest.mark.parametrize("gated", ["silu", "gelu_tanh"])
def test_gated_linear_interpreted(interpreted, backend, gated):
    _check_gated_linear(interpreted, "cpu", torch.float16, 5, 48, 160, backend, gated)


def test_gated_linear_refuses_an_unknown_activation_or_width():
    from mii.kernels import fp8_gemm

    x, q, scale, b = _operands(2, 16, 64, "cpu", torch.float32)
    with pytest.raises(AssertionError):
        fp8_gemm.fp8_linear(x, q, scale, b, gated="relu")
    with pytest.raises(AssertionError):
        fp8_gemm.fp8_linear(x, q, scale, b, gated="silu")  # x is not [gate | up] of K


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("shape", [(4096, 14336), (37, 14336), (300, 1408), (5, 7)])
def test_activation_and_quantization_in_one_pass_gpu(compiled, gelu, shape):
    _check_activation_then_quantization(compiled, "cuda", gelu, torch.bfloat16, *shape)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [16, 300])
def test_gated_linear_gpu(compiled, backend, m):
    _check_gated_linear(compiled, "cuda", torch.bfloat16, m, 4096, 1024, backend, "silu")


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_weight_only_matches_reference_gpu(compiled, shape, dtype):
    _check_weight_only(compiled.fp8_gemm, *shape, "cuda", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
def test_w8a8_matches_reference_gpu(compiled, shape):
    _check_w8a8(compiled.fp8_gemm, *shape, "cuda", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES)
@pytest.mark.parametrize("split_k", [1, 3])
def test_block_quantized_activations_match_reference_gpu(compiled, shape, split_k):
    """x quantized in the kernel per (row, K tile): the reference quantizes the same blocks;
    a sum of float8 products differs from it only by float32 rounding and the one-unit ties
    of the cast."""
    m, n, k = shape
    gemm = compiled.fp8_gemm
    tile = gemm.tile_for(m, n)._replace(split_k=split_k)
    x, q, scale, b = _operands(m, n, k, "cuda", torch.bfloat16)
    expected = fp8_block_w8a8_linear_ref(x.float(), q, scale, tile.block_k, b.float())
    with poisoned_allocations():
        out = gemm.fp8_gemm(x, q, scale, b, tile=tile, a_block_quant=True)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    assert rel_err(out, expected) < 1e-2
    # and finer than per-token scales against the exact product
    exact = fp8_linear_ref(x.float(), q, scale, b.float())
    qx, x_scale = quantize_rows(x)
    per_token = fp8_w8a8_linear_ref(qx, x_scale, q, scale, torch.float32, b)
    assert rel_err(out, exact) <= rel_err(per_token, exact) * 1.1


@pytest.mark.gpu
@pytest.mark.parametrize("split_k", [2, 4])
def test_split_k_matches_reference_gpu(compiled, split_k):
    tile = compiled.fp8_gemm.Fp8Tile(16, 32, 256, 4, 4, split_k=split_k)
    x, q, scale, b = _operands(3, 4096, 14336, "cuda", torch.bfloat16)
    expected = fp8_linear_ref(x.float(), q, scale, b.float())
    out = compiled.fp8_gemm.fp8_gemm(x, q, scale, b, tile=tile)
    assert out.dtype == torch.bfloat16 and rel_err(out, expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("cols", [64, 576, 4096, 14336])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantize_matches_reference_gpu(compiled, cols, dtype):
    x = (torch.randn(300, cols, device="cuda") * 3).to(dtype)
    x[7] = 0
    with poisoned_allocations():
        q, scale = compiled.fp8_quant.quantize_rows(x)
    want_q, want_scale = quantize_rows(x)
    assert torch.allclose(scale, want_scale, rtol=1e-6, atol=0)  # a division may differ by 1 ulp
    # the cast may round differently from torch's by one unit at a tie: compare values
    assert (q.float() - want_q.float()).abs().le(want_q.float().abs() / 8 + 1e-6).all()
    assert (q.float() != want_q.float()).float().mean() < 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 16, 17, 256])
def test_every_backend_matches_reference_gpu(compiled, backend, m):
    x, q, scale, b = _operands(m, 4096, 4096, "cuda", torch.bfloat16)
    expected = fp8_linear_ref(x.float(), q, scale, b.float())
    out = compiled.fp8_gemm.fp8_linear(x[:, None], q, scale, b, backend=backend)
    assert out.shape == (m, 1, 4096) and out.dtype == torch.bfloat16
    assert rel_err(out[:, 0], expected) < 0.05  # W8A8: activations rounded to fp8 too
