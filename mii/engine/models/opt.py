"""OPT: learned positions, LayerNorm, ReLU MLP, biases everywhere."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mii.engine.layers.activation import activation
from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mii.engine.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from mii.engine.tp.context import ParallelContext

POSITION_OFFSET = 2  # OPT's learned positions start at row 2 of their table


def _layer_norm(cfg: Any) -> nn.LayerNorm:
    affine = getattr(cfg, "layer_norm_elementwise_affine", True)
    return nn.LayerNorm(cfg.hidden_size, elementwise_affine=affine)


class OPTAttention(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        bias = getattr(cfg, "enable_bias", True)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, head_dim, heads, heads, bias, tp)
        self.out_proj = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, bias, tp)
        self.scaling = head_dim**-0.5
        local = self.qkv_proj.num_heads
        # q is scaled at its projection, as transformers does, so attention's scale is 1.
        self.attn = PagedAttention(local, local, head_dim, scale=1.0)

    def forward(self, x, positions, meta: AttentionMetadata) -> torch.Tensor:
        proj = self.qkv_proj
        q, k, v = proj(x).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = (q * self.scaling).view(-1, proj.num_heads, proj.head_dim)  # (T, H, D)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        return self.out_proj(self.attn(q, k, v, positions, None, meta).flatten(1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        bias = getattr(cfg, "enable_bias", True)
        self.pre_norm = cfg.do_layer_norm_before
        self.self_attn = OPTAttention(cfg, tp)
        self.self_attn_layer_norm = _layer_norm(cfg)
        self.fc1 = ColumnParallelLinear(cfg.hidden_size, cfg.ffn_dim, bias, tp)
        self.fc2 = RowParallelLinear(cfg.ffn_dim, cfg.hidden_size, bias, tp)
        self.final_layer_norm = _layer_norm(cfg)
        self.act = activation(cfg.activation_function)

    def _block(self, h, norm, fn):
        out = fn(norm(h) if self.pre_norm else h) + h
        return out if self.pre_norm else norm(out)

    def forward(self, h, positions, meta) -> torch.Tensor:
        h = self._block(h, self.self_attn_layer_norm, lambda x: self.self_attn(x, positions, meta))
        return self._block(h, self.final_layer_norm, lambda x: self.fc2(self.act(self.fc1(x))))


class OPTDecoder(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        proj_dim = cfg.word_embed_proj_dim
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, proj_dim, tp)
        positions = cfg.max_position_embeddings + POSITION_OFFSET
        self.embed_positions = nn.Embedding(positions, cfg.hidden_size)
        self.project_in = self.project_out = None
        if proj_dim != cfg.hidden_size:
            self.project_in = ReplicatedLinear(proj_dim, cfg.hidden_size)
            self.project_out = ReplicatedLinear(cfg.hidden_size, proj_dim)
        self.final_layer_norm = None
        if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False):
            self.final_layer_norm = _layer_norm(cfg)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids, positions, meta) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        h = h + self.embed_positions(positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, positions, meta)
        if self.final_layer_norm is not None:
            h = self.final_layer_norm(h)
        return h if self.project_out is None else self.project_out(h)


class OPTModel(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.decoder = OPTDecoder(cfg, tp)


class OPTForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
    }
    skipped_weights = ()

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__()
        self.model = OPTModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.word_embed_proj_dim, tp)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.decoder.embed_tokens.weight

    @staticmethod
    def checkpoint_name(name: str) -> str:
        # Some OPT checkpoints name their weights without the leading "model.".
        return "model." + name if name.startswith("decoder.") else name

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model.decoder(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
