"""FP8 weights for linear layers: float8 e4m3 with one float32 scale per output channel
(the layout of kernels/fp8_ref.py), either quantized from the checkpoint's weights once
they are loaded, or loaded as the checkpoint stores them (an FP8 checkpoint: no second
rounding). The GEMM is `dispatch.fp8_linear`: Triton or `torch._scaled_mm` on CUDA.

On the CPU the engine dequantizes each weight once, after loading, into the model's dtype
and packs it for oneDNN (`pack_for_cpu`): the very values of the FP8 weights at the speed
of unquantized ones, without FP8's memory saving. Dequantizing for every call instead
costs far more than the GEMM there (torch converts float8 at about 100 M values/s on two
cores: SmolLM2-135M would spend about a second a step on it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mii.engine.layers.cpu_linear import pack_weight, packed_linear
from mii.engine.layers.linear_method import LinearMethod
from mii.kernels import dispatch
from mii.kernels.fp8_ref import FP8, dequantize_rows, quantize_rows


def _param(data: torch.Tensor, loader=None) -> nn.Parameter:
    p = nn.Parameter(data, requires_grad=False)
    if loader is not None:
        p.weight_loader = loader
    return p


@dataclass(frozen=True)
class Fp8LinearMethod(LinearMethod):
    from_checkpoint: bool
    """The checkpoint holds this layer's weight in float8 with its `weight_scale` (as
    engine/quantization.py hands it over: one float32 per output row of the checkpoint)."""

    def prepare(self, layer: nn.Module) -> None:
        weight = layer.weight
        layer.compute_dtype = weight.dtype  # the model's: activations and outputs
        if not self.from_checkpoint:
            return  # the weight loads in the model's dtype; quantized after loading
        empty = torch.empty(weight.shape, dtype=FP8, device=weight.device)
        layer.weight = _param(empty, weight.weight_loader)
        rows = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
        # Per-channel scales shard with the weight's rows (column-parallel layers) or are
        # whole on every rank (row-parallel ones), exactly as a bias does.
        layer.weight_scale = _param(rows, layer.output_loader)

    def process_after_loading(self, layer: nn.Module) -> None:
        if self.from_checkpoint:
            return
        q, scale = quantize_rows(layer.weight.data)  # (N, K) float8, (N,) float32
        layer.weight = _param(q)
        layer.weight_scale = _param(scale)

    def pack_for_cpu(self, layer: nn.Module, batch_hint: int) -> None:
        weight = dequantize_rows(layer.weight, layer.weight_scale, layer.compute_dtype)
        layer.packed = pack_weight(weight, batch_hint)
        layer.dequantized = weight if layer.packed is None else None

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
        if layer.packed is not None:
            return packed_linear(x, layer.packed, bias)
        if getattr(layer, "dequantized", None) is not None:
            return F.linear(x, layer.dequantized, bias)
        return dispatch.fp8_linear(x, layer.weight, layer.weight_scale, bias,
                                   defer=layer.defer_splits, push=layer.push_to)  # fmt: skip

    def apply_gated(self, layer: nn.Module, x: torch.Tensor, bias, activation: str):
        if _on_cpu_weights(layer):
            return super().apply_gated(layer, x, bias, activation)
        # one row: the GEMV forms the activation as it loads x; more: activation, then GEMM
        weight, scale = layer.weight, layer.weight_scale
        return dispatch.fp8_linear(
            x, weight, scale, bias, activation, layer.defer_splits, layer.push_to
        )  # fmt: skip

    def takes_quantized_rows(self, layer: nn.Module, x: torch.Tensor) -> bool:
        return not _on_cpu_weights(layer) and dispatch.fp8_rows_wanted(x, layer.weight)


def _on_cpu_weights(layer: nn.Module) -> bool:
    """Whether the layer multiplies by the dequantized weights of `pack_for_cpu`."""
    return layer.packed is not None or getattr(layer, "dequantized", None) is not None


class Dequantized:
    """A float8 checkpoint weight read as float32 times its scale (one for the tensor, or
    one per row), indexed as the loaders index checkpoint weights (`w[a:b]`, `w[:, a:b]`,
    `w[...]`) without reading more of the file than the index asks."""

    def __init__(self, tensor: Any, scale: torch.Tensor) -> None:
        self.tensor, self.scale = tensor, scale

    def __getitem__(self, index) -> torch.Tensor:
        weight = self.tensor[index].float()
        return weight * self.row_scales(index, weight.shape[0])[:, None]

    def row_scales(self, index, rows: int) -> torch.Tensor:
        """The scale of each of the `rows` rows that `index` selects."""
        if self.scale.numel() == 1:
            return self.scale.expand(rows)
        first = index[0] if isinstance(index, tuple) else index
        return self.scale if first is Ellipsis else self.scale[first]
