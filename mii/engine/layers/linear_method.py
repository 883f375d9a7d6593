"""How a linear layer holds its weight and multiplies by it (vLLM's `LinearMethod`).

Every linear layer is built unquantized; a quantization (engine/quantization.py) hands the
layers it covers another method before the checkpoint loads. The layers keep sharding,
the method decides the parameters' dtypes and the GEMM: one implementation of each layer,
whatever its weights are stored in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mii.engine.layers.cpu_linear import pack_weight, packed_linear
from mii.kernels import dispatch


class LinearMethod:
    """The interface; the defaults suit a method that keeps the layer's parameters."""

    def prepare(self, layer: nn.Module) -> None:
        """Replace or add the layer's parameters before the checkpoint loads into them (a
        new parameter carries a `weight_loader` that shards it as the layer does)."""

    def process_after_loading(self, layer: nn.Module) -> None:
        """Turn the loaded parameters into what `apply` reads (e.g. quantize them)."""

    def pack_for_cpu(self, layer: nn.Module, batch_hint: int) -> None:
        """Reorder the weight for the CPU's GEMM, where that pays."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W.T (+ bias), W being what the layer's weight stands for."""
        raise NotImplementedError

    def apply_gated(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, activation: str
    ) -> torch.Tensor:
        """act(gate) * up @ W.T (+ bias) for a gated MLP's x = [gate | up] (`activation`:
        "silu" or "gelu_tanh"): the activation, then `apply`. Methods whose one-row GEMV
        folds the activation into its load of x override it."""
        return self.apply(layer, dispatch.act_and_mul(x, activation), bias)

    def takes_quantized_rows(self, layer: nn.Module, x: torch.Tensor) -> bool:
        """Whether `apply` would quantize x per token itself, so that the norm before the
        layer may hand it x's `QuantizedRows` instead (kernels/fp8_ref.py): FP8 layers."""
        return False


class UnquantizedLinearMethod(LinearMethod):
    """The weight in the model's dtype; on the CPU through oneDNN-packed weights once
    `pack_for_cpu` ran (layers/cpu_linear.py); one-row products on the GPU through the
    split-K GEMV of kernels/gemv.py (`dispatch.gemv_on`), larger ones through cuBLAS."""

    def pack_for_cpu(self, layer: nn.Module, batch_hint: int) -> None:
        layer.packed = pack_weight(layer.weight, batch_hint)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
        if layer.packed is not None:
            return packed_linear(x, layer.packed, bias)
        if dispatch.gemv_on(x):
            return dispatch.gemv(
                x, layer.weight, None, bias, defer=layer.defer_splits, push=layer.push_to
            )  # fmt: skip
        return F.linear(x, layer.weight, bias)

    def apply_gated(self, layer: nn.Module, x: torch.Tensor, bias, activation: str):
        if layer.packed is None and dispatch.gemv_on(x):
            return dispatch.gemv(
                x, layer.weight, None, bias, gated=activation, defer=layer.defer_splits,
                push=layer.push_to,
            )  # fmt: skip
        return super().apply_gated(layer, x, bias, activation)


UNQUANTIZED = UnquantizedLinearMethod()
