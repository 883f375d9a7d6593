"""Phi-2 (and Phi-1/1.5): attention and MLP side by side on one LayerNorm's output, partial
rotary, GELU, biases everywhere (the LM head's too)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mii.engine.layers.activation import activation
from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mii.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mii.engine.layers.rotary import cos_sin_cache, rope_parameters, rotary_dim
from mii.engine.models.family import head_dim, num_kv_heads
from mii.engine.tp.context import ParallelContext


class PhiAttention(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        dim = head_dim(cfg)
        heads = cfg.num_attention_heads
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, dim, heads, num_kv_heads(cfg), True, tp)
        self.dense = RowParallelLinear(heads * dim, cfg.hidden_size, True, tp)
        self.q_layernorm = self.k_layernorm = None
        if getattr(cfg, "qk_layernorm", False):
            self.q_layernorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        proj = self.qkv_proj
        self.attn = PagedAttention(proj.num_heads, proj.num_kv_heads, dim, scale=dim**-0.5)

    def forward(self, x, positions, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        proj = self.qkv_proj
        q, k, v = proj(x).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = q.view(-1, proj.num_heads, proj.head_dim)  # (T, Hq, D)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)  # (T, Hkv, D)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        return self.dense(self.attn(q, k, v, positions, cos_sin, meta).flatten(1))


class PhiMLP(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, True, tp)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, True, tp)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class PhiDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = PhiAttention(cfg, tp)
        self.mlp = PhiMLP(cfg, tp)

    def forward(self, h, positions, cos_sin, meta) -> torch.Tensor:
        normed = self.input_layernorm(h)
        return self.self_attn(normed, positions, cos_sin, meta) + self.mlp(normed) + h


class PhiModel(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, positions, cos_sin, meta) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, positions, cos_sin, meta)
        return self.final_layernorm(h)


class PhiForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    skipped_weights = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__()
        self.model = PhiModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp, bias=True)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rope = rope_parameters(cfg)
        table = cos_sin_cache(rotary_dim(head_dim(cfg), rope), max_positions, rope)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.cos_sin, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
