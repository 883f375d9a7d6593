"""Activations of the MLP: gated SwiGLU (llama) and GeGLU with tanh GELU (Gemma), and the
plain ones of OPT, Phi-2 and Falcon by their transformers names."""

import torch
import torch.nn.functional as F
from torch import nn

from mii.kernels import dispatch


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.silu_and_mul(x)


class GeluTanhAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dispatch.gelu_tanh_and_mul(x)


GATED_ACTIVATIONS = {"silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise NotImplementedError(f"activation {name!r} is not supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]
