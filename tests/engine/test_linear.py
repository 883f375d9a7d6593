"""A row-parallel layer's gated input (a gated MLP's down projection, `forward_gated`): a
one-row product takes the GEMV with the activation folded in, anything else the activation
and then the product as before; unquantized and FP8 weights, CPU-packed weights untouched.

On the CPU `dispatch.gemv_on` never admits a row, so the tests make it admit one and stand
in for the GEMV with its torch reference (the kernel's bits are tests/kernels'
test_gemv_kernel.py)."""

from __future__ import annotations

import pytest
import torch

from mii.engine.layers.fp8_linear import Fp8LinearMethod
from mii.engine.layers.linear import RowParallelLinear
from mii.engine.tp.context import ParallelContext
from mii.kernels import dispatch

pytestmark = pytest.mark.timeout(60)
INNER, HIDDEN = 96, 40


@pytest.fixture
def gemv_calls(monkeypatch):
    """One-row inputs admitted to the GEMV, which `gemv_ref` stands in for; the `gated`
    argument of each call."""
    calls = []

    def gemv(x, weight, w_scale, bias, gated=None, defer=False, push=None):  # y: defer allows it
        assert push is None, "one rank: nothing to push"
        from mii.kernels.gemv import gemv_ref  # imports triton: at run time, not collection

        calls.append(gated)
        return gemv_ref(x, weight, w_scale, bias, gated=gated)

    monkeypatch.setattr(dispatch, "gemv_on", lambda x: x.dim() == 2 and x.shape[0] == 1)
    monkeypatch.setattr(dispatch, "gemv", gemv)
    return calls


def _layer(fp8: bool) -> RowParallelLinear:
    gen = torch.Generator().manual_seed(0)
    layer = RowParallelLinear(INNER, HIDDEN, bias=True, tp=ParallelContext())
    layer.weight.data.copy_(torch.randn(HIDDEN, INNER, generator=gen) * 0.1)
    layer.bias.data.copy_(torch.randn(HIDDEN, generator=gen))
    if fp8:
        layer.method = Fp8LinearMethod(from_checkpoint=False)
        layer.method.prepare(layer)
        layer.method.process_after_loading(layer)
    return layer


def _gate_up(rows: int) -> torch.Tensor:
    return 3 * torch.randn(rows, 2 * INNER, generator=torch.Generator().manual_seed(rows))


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_one_row_takes_the_gated_gemv_and_more_rows_the_old_path(gemv_calls, fp8, activation):
    layer = _layer(fp8)
    rows = _gate_up(3)
    old = layer(dispatch.act_and_mul(rows, activation))  # (3, HIDDEN)
    assert torch.equal(layer.forward_gated(rows, activation), old)
    assert gemv_calls == []
    one = layer.forward_gated(rows[:1], activation)
    assert gemv_calls == [activation]
    assert one.shape == (1, HIDDEN)
    torch.testing.assert_close(one, old[:1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_weights_packed_for_the_cpu_take_the_activation_then_the_product(gemv_calls, fp8):
    layer = _layer(fp8)
    layer.pack_for_cpu(batch_hint=1)
    if layer.packed is None and getattr(layer, "dequantized", None) is None:
        pytest.skip("no oneDNN packing here")
    row = _gate_up(1)
    expected = layer(dispatch.act_and_mul(row, "silu"))
    assert torch.equal(layer.forward_gated(row, "silu"), expected)
    assert gemv_calls == []


def test_an_unknown_activation_is_refused():
    with pytest.raises(ValueError):
        _layer(False).forward_gated(_gate_up(2), "relu")
