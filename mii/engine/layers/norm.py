"""RMSNorm with the residual add fused in (llama family; Gemma's scale is 1 + weight)."""

from __future__ import annotations

import torch
from torch import nn

from mii.engine.tp.context import ParallelContext
from mii.kernels import dispatch


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, unit_offset: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (norm(x + residual), x + residual)."""
        return dispatch.rms_norm(x, self.weight, self.eps, residual, self.unit_offset)

    def after_all_reduce(
        self, x: torch.Tensor, residual: torch.Tensor, tp: ParallelContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`self(tp.all_reduce(x), residual)` for x a row-parallel projection's partial
        sums: one launch where the one-shot peer all-reduce takes it (decode steps)."""
        peer = tp.peer
        fused = peer is not None and residual is not None and not self.unit_offset
        if fused and peer.fits_norm(x, residual, self.weight):
            return peer.add_norm(x, residual, self.weight, self.eps)
        return self(tp.all_reduce(x), residual)
