"""Weights pulled into L2 while the kernels between two projections leave HBM idle.

A batch-1 decode step reads every weight once and is bound by that; but between the
projections run kernels that read almost nothing (rope and attention over a short context
after the QKV projection, all-reduces and norms after the output and down projections),
and for those microseconds the memory system idles. Here a projection, right after
launching its one-row product, starts its successor's first bytes on their way into L2
(kernels/l2_prefetch.py), on a side stream that waits for the product and runs beside the
small kernels; the successor's product then finds those bytes in L2 (or on their way).
Nothing waits for a prefetch (it writes nothing) but the end of the forward, where the
side stream joins the current one: a CUDA graph capture must end joined.

The pairs: QKV -> output projection (over the attention), output -> gate_up (over the
all-reduce and norm), down -> the next layer's QKV (likewise): `successors`. At most
`MII_L2_PREFETCH_BYTES` of each (0: off).
"""

from __future__ import annotations

import os

import torch
from torch import nn

DEFAULT_MAX_BYTES = 0
MAX_ROWS = 1
"""Products of at most this many rows (batch-1 decode steps) prefetch their successor."""


def max_bytes_setting() -> int:
    return int(os.environ.get("MII_L2_PREFETCH_BYTES", DEFAULT_MAX_BYTES))


class WeightPrefetch:
    """One device's side stream and whether a prefetch on it is not yet joined."""

    def __init__(self, device: torch.device, max_bytes: int) -> None:
        self.stream = torch.cuda.Stream(device)
        self.max_bytes = max_bytes
        self.pending = False

    def start(self, x: torch.Tensor, weight: torch.Tensor) -> None:
        """After the product of x was launched: weight's first bytes into L2 beside what
        comes next on the current stream (one-row x only)."""
        if x.dim() != 2 or x.shape[0] > MAX_ROWS:
            return
        from mii.kernels.l2_prefetch import l2_prefetch  # triton: imported on the GPU path only

        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            l2_prefetch(weight, self.max_bytes)
        self.pending = True

    def join(self) -> None:
        """The current stream waits for the prefetches started so far (at the end of the
        forward)."""
        if self.pending:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.pending = False


def successors(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(projection, the projection whose weights it prefetches) for the decoder layers of
    `model.model.layers` whose modules have the llama names; others get none."""
    layers = getattr(getattr(model, "model", None), "layers", None) or []

    def find(layer, part, name):
        return getattr(getattr(layer, part, None), name, None)

    pairs = []
    for i, layer in enumerate(layers):
        qkv, o = find(layer, "self_attn", "qkv_proj"), find(layer, "self_attn", "o_proj")
        gate_up, down = find(layer, "mlp", "gate_up_proj"), find(layer, "mlp", "down_proj")
        after = find(layers[i + 1], "self_attn", "qkv_proj") if i + 1 < len(layers) else None
        pairs += [(a, b) for a, b in ((qkv, o), (o, gate_up), (down, after)) if a and b]
    return [(a, b) for a, b in pairs if isinstance(getattr(b, "weight", None), torch.Tensor)]


def attach(model: nn.Module, device: torch.device) -> WeightPrefetch | None:
    """Give the model's projections their prefetches (CUDA, MII_L2_PREFETCH_BYTES > 0);
    None where it stays off. Call once the weights are in place, before graph capture."""
    max_bytes = max_bytes_setting()
    if device.type != "cuda" or max_bytes <= 0:
        return None
    pairs = successors(model)
    if not pairs:
        return None
    prefetch = WeightPrefetch(device, max_bytes)
    link(model, pairs, prefetch)
    return prefetch


def link(model: nn.Module, pairs: list[tuple[nn.Module, nn.Module]], prefetch) -> None:
    """Each pair's first projection prefetches the second's weights through `prefetch`,
    which the model joins at the end of its forward."""
    for a, b in pairs:
        a.prefetch = prefetch
        a.prefetch_next = b.weight.detach()  # a plain tensor: a Parameter would register
    model.register_forward_hook(lambda *_: prefetch.join())
