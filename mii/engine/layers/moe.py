"""The mixture-of-experts MLP (Mixtral, Qwen2-MoE): a router, E gated SiLU experts run by
one fused kernel (kernels/fused_moe.py on CUDA, its torch reference on CPU), and Qwen2-MoE's
shared expert behind its sigmoid gate.

Tensor parallelism splits each expert's intermediate dimension over the group, as for the
dense MLP: a rank holds its slice of every expert's gate and up rows and down columns, so
its output is a partial sum. The router and the shared expert's gate are replicated; the
shared expert is split the same way, and its partial sum (scaled by its gate, which is
linear in it) joins the experts' before the layer's one all-reduce.

FP8 (engine/quantization.py): on CUDA the experts can be held in float8 e4m3 with one
float32 scale per expert and output row (the fused kernel converts them in registers), half
their bytes. `store_fp8` before the checkpoint loads: an FP8 checkpoint's values and scales
go in as stored, an unquantized checkpoint's rows are quantized as they arrive (a row's
scale is its own, so that equals quantizing after loading, and the experts never exist in
the model's dtype: a bf16 Mixtral-8x7B loads into FP8 on one 80 GB GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from mii.engine.layers.fp8_linear import Dequantized
from mii.engine.layers.linear import (
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from mii.engine.tp.context import ParallelContext
from mii.kernels import dispatch
from mii.kernels.fp8_ref import FP8, quantize_rows


class ExpertStack(nn.Module):
    """One weight of every expert, stacked: (E, rows, cols)."""

    def __init__(self, shape: tuple[int, int, int], loader) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)
        self.weight.weight_loader = loader


class FusedExperts(nn.Module):
    """gate_up (E, 2I/tp, H): each expert's gate rows then its up rows; down (E, H, I/tp).
    Checkpoints hold one matrix per expert and projection; the loaders' shard ids say which:
    (expert, 0 for gate or 1 for up), or the expert for down."""

    def __init__(self, num_experts: int, hidden: int, inner: int, tp: ParallelContext):
        super().__init__()
        self.tp = tp
        self.inner = tp.shard(inner, "expert intermediate size")
        self.gate_up = ExpertStack((num_experts, 2 * self.inner, hidden), self._load_gate_up)
        self.down = ExpertStack((num_experts, hidden, self.inner), self._load_down)
        self.register_buffer("gate_up_scale", None, persistent=False)
        self.register_buffer("down_scale", None, persistent=False)

    @property
    def scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Float8 experts' row scales, gate_up's (E, 2I/tp) and down's (E, H); None when
        the experts are in the model's dtype."""
        return None if self.gate_up_scale is None else (self.gate_up_scale, self.down_scale)

    def store_fp8(self) -> None:
        """Hold the experts in float8 from now on: the loaders copy an FP8 checkpoint's
        values and row scales as stored (and quantize the rows of any expert it holds
        unquantized)."""
        for stack, scale in ((self.gate_up, "gate_up_scale"), (self.down, "down_scale")):
            weight = stack.weight
            rows = torch.empty(weight.shape[:2], dtype=torch.float32, device=weight.device)
            self.register_buffer(scale, rows, persistent=False)
            stack.weight = nn.Parameter(torch.empty_like(weight, dtype=FP8), False)
            stack.weight.weight_loader = weight.weight_loader

    def init_random(self, std: float, generator: torch.Generator) -> None:
        """Random float8 experts (benchmarks): each expert's rows drawn from Normal(0, std)
        and quantized, one expert's float32 draw at a time; nothing for experts in the
        model's dtype (drawn with the other weights)."""
        if self.scales is None:
            return
        for stack, scale in zip((self.gate_up, self.down), self.scales, strict=True):
            weights = stack.weight.data
            for expert in range(weights.shape[0]):
                rows = torch.empty(weights.shape[1:], device=weights.device)
                rows.normal_(0.0, std, generator=generator)
                weights[expert], scale[expert] = quantize_rows(rows)

    def _load_gate_up(self, param: nn.Parameter, loaded, shard: tuple[int, int]) -> None:
        expert, part = shard
        start = self.tp.rank * self.inner
        rows = slice(part * self.inner, (part + 1) * self.inner)
        self._put(param, 0, expert, rows, loaded, slice(start, start + self.inner))

    def _load_down(self, param: nn.Parameter, loaded, expert: int) -> None:
        start = self.tp.rank * self.inner
        columns = (slice(None), slice(start, start + self.inner))
        self._put(param, 1, expert, slice(None), loaded, columns)

    def _put(self, param: nn.Parameter, stack: int, expert: int, rows: slice, loaded, index):
        """loaded[index] into the expert's `rows` of the stack; float8 experts take an FP8
        checkpoint's values with the scales of those rows, or quantize what they get."""
        target = param.data[expert, rows]
        if self.scales is None:
            target.copy_(loaded[index])
            return
        scale = self.scales[stack][expert, rows]
        if isinstance(loaded, Dequantized):
            target.copy_(loaded.tensor[index])
            scale.copy_(loaded.row_scales(index, target.shape[0]))
        else:  # quantized where the experts live (the GPU's arithmetic, not the host's)
            target[...], scale[...] = quantize_rows(loaded[index].to(target.device))


class SharedExpert(nn.Module):
    """A gated SiLU MLP whose down projection leaves its partial sum unreduced."""

    def __init__(self, hidden: int, inner: int, tp: ParallelContext) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inner, inner], False, tp)
        self.down_proj = RowParallelLinear(inner, hidden, False, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The activation inside the down projection (one-row GPU steps: in its GEMV).
        return self.down_proj.forward_gated(self.gate_up_proj(x), "silu", reduce=False)


class SparseMoeBlock(nn.Module):
    def __init__(
        self,
        hidden: int,
        num_experts: int,
        top_k: int,
        inner: int,
        renormalize: bool,
        tp: ParallelContext,
        shared_inner: int | None = None,
    ) -> None:
        super().__init__()
        self.tp = tp
        self.top_k = top_k
        self.renormalize = renormalize
        self.gate = ReplicatedLinear(hidden, num_experts)  # the router
        self.experts = FusedExperts(num_experts, hidden, inner, tp)
        self.shared_expert = self.shared_expert_gate = None
        if shared_inner:
            self.shared_expert = SharedExpert(hidden, shared_inner, tp)
            self.shared_expert_gate = ReplicatedLinear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.gate(x)  # (T, E)
        experts = self.experts
        # Without a shared expert, the sum of each token's top-k outputs goes into the
        # all-reduce (one launch for both on the peer path of decode steps).
        fold = self.tp.world_size > 1 and self.shared_expert is None
        out = dispatch.fused_moe(
            x, logits, experts.gate_up.weight, experts.down.weight, self.top_k, self.renormalize,
            experts.scales, sum_top_k=not fold,
        )  # fmt: skip
        if fold:
            return self.tp.sum_rows_and_all_reduce(out)
        if self.shared_expert is not None:
            gate = torch.sigmoid(self.shared_expert_gate(x))  # (T, 1)
            out = out + gate * self.shared_expert(x)
        return self.tp.all_reduce(out)


def expert_checkpoint_names(num_experts: int, gate: str, up: str, down: str) -> dict:
    """`packed_modules` entries that send each expert's checkpoint matrices into the stacks:
    `experts.{e}.{gate}` to experts.gate_up with shard (e, 0), and so on."""
    names = {}
    for e in range(num_experts):
        names[f"experts.{e}.{gate}"] = ("experts.gate_up", (e, 0))
        names[f"experts.{e}.{up}"] = ("experts.gate_up", (e, 1))
        names[f"experts.{e}.{down}"] = ("experts.down", e)
    return names
