"""Gated activation of the llama MLP."""

import torch
from torch import nn

from mii.kernels import dispatch


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.silu_and_mul(x)
