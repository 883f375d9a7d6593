"""oneDNN-packed weights for linear layers on the CPU.

MKL's sgemm, which `F.linear` uses on the CPU, runs the skinny matrices of decoding
(a few dozen rows against thousands of columns) at well under the cores' peak; oneDNN
with weights reordered once into its blocked layout runs them 1.5-2.5x faster on the
2-core machines we measure on (scripts/bench_cpu.py).
"""

from __future__ import annotations

import torch


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack_weight(weight: torch.Tensor, batch_hint: int) -> torch.Tensor | None:
    """The weight in oneDNN's layout, or None where packing does not apply."""
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or not packing_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # oneDNN misreads rows of a strided (non-contiguous) input: hand it dense rows.
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
