"""The gated activations (SwiGLU, GeGLU) against `silu_and_mul_ref` and
`gelu_tanh_and_mul_ref`."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, poisoned_allocations, rel_err

from mii.kernels.torch_ref import gelu_tanh_and_mul_ref, silu_and_mul_ref

ACTIVATIONS = {"silu": silu_and_mul_ref, "gelu_tanh": gelu_tanh_and_mul_ref}


def _check(module, tokens, inner, dtype, device, activation="silu"):
    x = torch.randn(tokens, 2 * inner, generator=torch.Generator().manual_seed(inner))
    x = 3 * x.to(device=device, dtype=dtype)
    with poisoned_allocations():
        out = getattr(module, f"{activation}_and_mul")(x)
    assert out.shape == (tokens, inner) and out.dtype == dtype
    assert rel_err(out, ACTIVATIONS[activation](x)) < TOLERANCE[dtype]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("inner", [64, 1536, 1100])  # 1100: a partial last block
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(interpreted, activation, inner, dtype):
    _check(interpreted.activation, 4, inner, dtype, "cpu", activation)


def test_the_two_activations_differ():
    x = torch.randn(3, 64)
    assert rel_err(gelu_tanh_and_mul_ref(x), silu_and_mul_ref(x)) > 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("inner", [1536, 14336, 1100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_reference_gpu(compiled, activation, inner, dtype):
    _check(compiled.activation, 257, inner, dtype, "cuda", activation)
