"""Gemma-2: the llama family's attention (soft-capped, with alternating sliding-window and
global layers) and GeGLU MLP in a block with four norms: each sublayer's output is normed
again before it joins the residual stream."""

from __future__ import annotations

from typing import Any

from torch import nn

from mii.engine.layers.norm import RMSNorm
from mii.engine.models.family import Family
from mii.engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP
from mii.engine.tp.context import ParallelContext


class Gemma2DecoderLayer(nn.Module):
    def __init__(self, cfg: Any, fam: Family, layer: int, tp: ParallelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, fam, layer, tp)
        self.mlp = LlamaMLP(cfg, fam, tp)
        for name in (
            "input_layernorm",
            "post_attention_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            setattr(self, name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, unit_offset=True))

    def forward(self, h, residual, positions, cos_sin, meta):
        # residual + h joins the previous layer's output; the sum is the residual stream.
        normed, residual = self.input_layernorm(h, residual)
        h = self.post_attention_layernorm(self.self_attn(normed, positions, cos_sin, meta))[0]
        normed, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(normed))[0], residual


class Gemma2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Gemma2DecoderLayer
