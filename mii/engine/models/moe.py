"""The mixture-of-experts members of the llama family: Mixtral (Mistral's attention, every
MLP a sparse block of top-2 of 8 experts, weights renormalised) and Qwen2-MoE (Qwen2's
attention; sparse blocks with a shared expert on the layers its config names, dense MLPs
on the others; weights renormalised as `norm_topk_prob` says).

Everything but the MLP is models/llama.py's; the sparse block is layers/moe.py's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mii.engine.layers.moe import SparseMoeBlock, expert_checkpoint_names
from mii.engine.models.family import Family
from mii.engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from mii.engine.tp.context import ParallelContext


@dataclass(frozen=True)
class MoeSpec:
    num_experts: int
    top_k: int
    inner: int
    """Each expert's intermediate size."""
    renormalize: bool
    shared_inner: int | None
    """The shared expert's intermediate size (Qwen2-MoE), None without one."""
    sparse_layers: frozenset[int]
    checkpoint_names: tuple[str, str, str]
    """The checkpoint's names of each expert's gate, up and down projections."""

    @classmethod
    def of(cls, cfg: Any) -> MoeSpec:
        layers = range(cfg.num_hidden_layers)
        if cfg.model_type == "mixtral":
            return cls(
                cfg.num_local_experts, cfg.num_experts_per_tok, cfg.intermediate_size,
                True, None, frozenset(layers), ("w1", "w3", "w2"),
            )  # fmt: skip
        if cfg.model_type == "qwen2_moe":
            dense = set(getattr(cfg, "mlp_only_layers", None) or ())
            step = cfg.decoder_sparse_step
            sparse = [i for i in layers if i not in dense and (i + 1) % step == 0]
            return cls(
                cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                bool(cfg.norm_topk_prob), cfg.shared_expert_intermediate_size or None,
                frozenset(sparse if cfg.num_experts else ()),
                ("gate_proj", "up_proj", "down_proj"),
            )  # fmt: skip
        raise NotImplementedError(f"mixture of experts of {cfg.model_type!r}")


class MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, cfg: Any, fam: Family, layer: int, tp: ParallelContext) -> nn.Module:
        spec = MoeSpec.of(cfg)
        if layer not in spec.sparse_layers:
            return super().build_mlp(cfg, fam, layer, tp)
        return SparseMoeBlock(
            cfg.hidden_size, spec.num_experts, spec.top_k, spec.inner, spec.renormalize, tp,
            spec.shared_inner,
        )  # fmt: skip


class LlamaMoeForCausalLM(LlamaForCausalLM):
    decoder_layer = MoeDecoderLayer

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__(cfg, tp, max_positions)
        spec = MoeSpec.of(cfg)
        # The experts' entries first: the dense ones would take `experts.3.gate_proj` too.
        experts = expert_checkpoint_names(spec.num_experts, *spec.checkpoint_names)
        self.packed_modules = {**experts, **LlamaForCausalLM.packed_modules}

    @staticmethod
    def checkpoint_name(name: str) -> str:
        return name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's name for the MLP
