"""The llama family in one implementation: Llama 1/2/3, Mistral and Qwen2.

Differences are configuration: GQA head counts, rope scaling (llama3), q/k/v biases (Qwen2),
tied embeddings (small Llama 3.2 and Qwen2 checkpoints).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mii.engine.layers.activation import SiluAndMul
from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mii.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from mii.engine.layers.norm import RMSNorm
from mii.engine.layers.rotary import cos_sin_cache, rope_parameters
from mii.engine.tp.context import ParallelContext


def _head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _num_kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def _qkv_bias(cfg: Any) -> bool:
    # Qwen2 always has q/k/v biases; Llama-family configs say so in attention_bias.
    return cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        head_dim = _head_dim(cfg)
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size,
            head_dim,
            cfg.num_attention_heads,
            _num_kv_heads(cfg),
            _qkv_bias(cfg),
            tp,
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * head_dim,
            cfg.hidden_size,
            bool(getattr(cfg, "attention_bias", False)),
            tp,
        )
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.attn = PagedAttention(heads, kv_heads, head_dim, scale=head_dim**-0.5)

    def forward(self, x, positions, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        proj = self.qkv_proj
        q, k, v = qkv.split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = q.view(-1, proj.num_heads, proj.head_dim)  # (T, Hq, D)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)  # (T, Hkv, D)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        out = self.attn(q, k, v, positions, cos_sin, meta)  # (T, Hq, D)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        bias = bool(getattr(cfg, "mlp_bias", False))
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [size, size], bias, tp)
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, bias, tp)
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, tp)
        self.mlp = LlamaMLP(cfg, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, residual, positions, cos_sin, meta):
        normed, residual = self.input_layernorm(h, residual)
        h = self.self_attn(normed, positions, cos_sin, meta)
        normed, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, cos_sin, meta) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(h, residual, positions, cos_sin, meta)
        return self.norm(h, residual)[0]


class LlamaForCausalLM(nn.Module):
    # Checkpoint names of the projections that we fuse, with their slot in the fused weight.
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }
    skipped_weights = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__()
        self.model = LlamaModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        table = cos_sin_cache(_head_dim(cfg), max_positions, rope_parameters(cfg))
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.cos_sin, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
