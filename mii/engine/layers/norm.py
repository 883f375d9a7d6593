"""RMSNorm with the residual add fused in (llama family; Gemma's scale is 1 + weight)."""

from __future__ import annotations

import torch
from torch import nn

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
