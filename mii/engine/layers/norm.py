"""RMSNorm with the residual add fused in (llama family; Gemma's scale is 1 + weight)."""

from __future__ import annotations

import torch
from torch import nn

from mii.engine.layers.linear import LinearBase
from mii.engine.tp.context import ParallelContext
from mii.kernels import dispatch
from mii.kernels.fp8_ref import QuantizedRows
from mii.kernels.torch_ref import Pushed, SplitSums


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(
        self,
        x: torch.Tensor | SplitSums,
        residual: torch.Tensor | None = None,
        before: LinearBase | None = None,
    ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """Returns (norm(x + residual), x + residual). `before`: the linear layer that
        alone takes the normed rows; where it would quantize them per token (FP8), they
        come quantized (`QuantizedRows`, from the same kernel)."""
        # A GEMV's SplitSums is one row: the GEMV after takes it unquantized too.
        deferred = isinstance(x, SplitSums)
        quantize = before is not None and not deferred and before.takes_quantized_rows(x)
        return dispatch.rms_norm(x, self.weight, self.eps, residual, self.unit_offset, quantize)

    def after_all_reduce(
        self,
        x: torch.Tensor,
        residual: torch.Tensor,
        tp: ParallelContext,
        before: LinearBase | None = None,
    ) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
        """`self(tp.all_reduce(x), residual, before)` for x a row-parallel projection's
        partial sums: one launch where the one-shot peer all-reduce takes it (decode steps).
        x may come `Pushed` (`LinearBase.push_to`): its GEMV sent it to the peers already."""
        peer = tp.peer
        if isinstance(x, Pushed):
            assert peer.fits_norm(x.y, residual, self.weight) and not self.unit_offset
            return peer.add_norm(x.y, residual, self.weight, self.eps, pushed=True)
        fused = peer is not None and residual is not None and not self.unit_offset
        if fused and peer.fits_norm(x, residual, self.weight):
            return peer.add_norm(x, residual, self.weight, self.eps)
        return self(tp.all_reduce(x), residual, before)
