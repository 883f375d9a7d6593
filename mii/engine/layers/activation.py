"""The plain activations of OPT, Phi-2 and Falcon by their transformers names. The gated
ones (SwiGLU, Gemma's GeGLU) run inside the down projection: `RowParallelLinear.forward_gated`
(kernels/dispatch.py `act_and_mul` where the GEMV does not take them)."""

import torch
import torch.nn.functional as F


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
