"""Fused residual add + RMSNorm against `rms_norm_ref`; its per-token FP8 quantization
(`quantize=True`) against `quantize_rows` of its output: bit for bit interpreted, within
one code on the GPU."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels.fp8_ref import quantize_rows as quantize_rows_ref
from mii.kernels.torch_ref import rms_norm_ref


def _check(module, tokens, hidden, dtype, weight_dtype, with_residual, device, unit_offset=False):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    residual = residual if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=weight_dtype)
    expected, expected_residual = rms_norm_ref(x, weight, 1e-6, residual, unit_offset)
    with poisoned_allocations():
        out, new_residual = module.rms_norm(x, weight, 1e-6, residual, unit_offset)
    assert out.dtype == expected.dtype and new_residual.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]
    assert torch.equal(new_residual, expected_residual)  # one rounding, as torch's add
    assert with_residual or new_residual is x


def _inputs(tokens, hidden, dtype, with_residual, device):
    gen = torch.Generator().manual_seed(hidden)
    x = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    residual = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=dtype)
    x[0] *= 1000  # rows of different sizes: a scale from the wrong row shows
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    return x, (residual if with_residual else None), weight


def _check_quantized(
    kernels, tokens, hidden, dtype, with_residual, device, unit_offset=False, exact=True
):  # fmt: skip
    """`exact`: the bits of the two kernels. Compiled for sm_90 the two kernels' row sums
    may differ in their last float32 bit, which moves a rare normed element one bfloat16
    step (2 of 1,228,800 at 300 x 4096 on an H100); then its code may be the next one."""
    x, residual, weight = _inputs(tokens, hidden, dtype, with_residual, device)
    normed, expected_residual = kernels.rms_norm.rms_norm(x, weight, 1e-6, residual, unit_offset)
    want_q, want_scale = kernels.fp8_quant.quantize_rows(normed)
    with poisoned_allocations():
        rows, new_residual = kernels.rms_norm.rms_norm(
            x, weight, 1e-6, residual, unit_offset, quantize=True
        )
    assert rows.dtype == normed.dtype and rows.q.dtype == torch.float8_e4m3fn
    got, want = rows.q.view(torch.uint8), want_q.view(torch.uint8)
    if exact:
        assert torch.equal(got, want)
        assert torch.equal(rows.scale, want_scale)
    else:  # e4m3 codes of one sign are ordered by magnitude: the next value is the next code
        differ = got != want
        assert int(differ.sum()) <= got.numel() // 10_000
        assert ((got.int() - want.int()).abs() <= 1).all()
        assert torch.equal(got >= 128, want >= 128)  # the sign bit
        torch.testing.assert_close(rows.scale, want_scale, rtol=2**-7, atol=0)
    assert torch.equal(new_residual, expected_residual)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("unit_offset", [False, True])
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_rows_are_the_bits_of_norm_then_quantize_interpreted(
    interpreted, unit_offset, with_residual, dtype
):
    _check_quantized(interpreted, 5, 576, dtype, with_residual, "cpu", unit_offset)


@pytest.mark.timeout(60)
def test_quantized_rows_give_an_fp8_linear_the_bits_of_the_normed_rows_interpreted(interpreted):
    x, residual, weight = _inputs(5, 64, torch.float16, True, "cpu")
    w_q, w_scale = quantize_rows_ref(
        torch.randn(48, 64, generator=torch.Generator().manual_seed(1))
    )
    gemm = interpreted.fp8_gemm
    normed, _ = interpreted.rms_norm.rms_norm(x, weight, 1e-6, residual)
    rows, _ = interpreted.rms_norm.rms_norm(x, weight, 1e-6, residual, quantize=True)
    want = gemm.fp8_linear(normed, w_q, w_scale, backend="triton_w8a8")
    assert torch.equal(gemm.fp8_linear(rows, w_q, w_scale, backend="triton_w8a8"), want)
    with pytest.raises(AssertionError, match="W8A8|triton_w8a8"):
        gemm.fp8_linear(rows, w_q, w_scale, backend="triton")  # weight-only: x unquantized


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [576, 4096])
def test_quantized_rows_are_the_bits_of_norm_then_quantize_gpu(compiled, with_residual, hidden):
    _check_quantized(compiled, 300, hidden, torch.bfloat16, with_residual, "cuda", exact=False)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [64, 576, 4096])  # 576: SmolLM2, not a power of two
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(interpreted, with_residual, hidden, dtype):
    _check(interpreted.rms_norm, 5, hidden, dtype, dtype, with_residual, "cpu")


def test_float32_weight_promotes_like_torch_interpreted(interpreted):
    _check(interpreted.rms_norm, 3, 64, torch.float16, torch.float32, True, "cpu")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemma_unit_offset_interpreted(interpreted, with_residual, dtype):
    _check(interpreted.rms_norm, 5, 576, dtype, dtype, with_residual, "cpu", unit_offset=True)
    x, w = torch.randn(2, 64), torch.randn(64)
    offset = rms_norm_ref(x, w, 1e-6, unit_offset=True)[0]
    assert torch.allclose(offset, rms_norm_ref(x, w + 1, 1e-6)[0], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("hidden", [576, 4096, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu(compiled, with_residual, hidden, dtype):
    _check(compiled.rms_norm, 300, hidden, dtype, dtype, with_residual, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [2304, 3584])  # Gemma-2 2B, 9B
def test_gemma_unit_offset_gpu(compiled, hidden):
    _check(compiled.rms_norm, 300, hidden, torch.bfloat16, torch.bfloat16, True, "cuda", True)


def _check_split_sums(module, gemv, device, dtype, fp8, with_residual, bias, quantize=False):
    """x as a GEMV's SplitSums: the bits of the norm of the GEMV's stored y, and the second
    result that y (+ the residual), a tensor of its own."""
    gen = torch.Generator().manual_seed(3)
    hidden, k = 160, 320
    h = torch.randn(1, k, generator=gen).to(device=device, dtype=dtype)
    w = torch.randn(hidden, k, generator=gen) * 0.05
    if fp8:
        w, scale = quantize_rows_ref(w.to(device))
    else:
        w, scale = w.to(device=device, dtype=dtype), None
    b = torch.randn(hidden, generator=gen).to(device=device, dtype=dtype) if bias else None
    tile = gemv.GemvTile(16, 64, 3)
    residual = torch.randn(1, hidden, generator=gen).to(device=device, dtype=dtype)
    residual = residual if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(device=device, dtype=dtype)
    with poisoned_allocations():
        y = gemv.gemv(h, w, scale, b, tile=tile)
        expected, expected_residual = module.rms_norm(y, weight, 1e-6, residual, False, quantize)
        sums = gemv.gemv(h, w, scale, b, tile=tile, defer=True)
        out, new_residual = module.rms_norm(sums, weight, 1e-6, residual, False, quantize)
    assert isinstance(sums, gemv.SplitSums)
    if quantize:
        assert torch.equal(out.q.view(torch.uint8), expected.q.view(torch.uint8))
        assert torch.equal(out.scale, expected.scale)
    else:
        assert torch.equal(out, expected)
    assert torch.equal(new_residual, expected_residual) and new_residual.shape == (1, hidden)


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_split_sums_input_interpreted(interpreted, with_residual, fp8):
    gemv = importlib.import_module("mii.kernels.gemv")
    _check_split_sums(interpreted.rms_norm, gemv, "cpu", torch.float32, fp8, with_residual,
                      bias=with_residual, quantize=fp8 and with_residual)  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
def test_split_sums_input_gpu(compiled, with_residual, fp8):
    gemv = importlib.import_module("mii.kernels.gemv")
    _check_split_sums(compiled.rms_norm, gemv, "cuda", torch.bfloat16, fp8, with_residual,
                      bias=not with_residual)  # fmt: skip
