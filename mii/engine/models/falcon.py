"""Falcon: attention and MLP side by side (7B: one LayerNorm and multi-query attention;
40B/180B, transformers' "new decoder architecture": grouped kv heads and a LayerNorm for
each branch), or one after the other (old architecture without parallel_attn). Rotary
positions; ALiBi checkpoints (Falcon-RW) are not supported.

The checkpoint fuses q, k and v in one weight whose row order depends on the form: grouped
(per kv head: its query heads, then k, then v), multi-query (all query heads, k, v) or
per head (q, k, v of each head); the loader reorders it into q | k | v.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mii.engine.layers.activation import activation
from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mii.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from mii.engine.layers.rotary import cos_sin_cache, rope_parameters
from mii.engine.tp.context import ParallelContext


def falcon_kv_heads(cfg: Any) -> int:
    if cfg.new_decoder_architecture or not cfg.multi_query:
        return cfg.num_kv_heads
    return 1


class FalconQKV(QKVParallelLinear):
    """The fused projection, loaded from Falcon's row order."""

    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        heads, kv_heads = cfg.num_attention_heads, falcon_kv_heads(cfg)
        self.grouped = cfg.new_decoder_architecture
        self.per_head = not self.grouped and not cfg.multi_query
        dim = cfg.hidden_size // heads
        super().__init__(cfg.hidden_size, dim, heads, kv_heads, cfg.bias, tp)

    def _load(self, param: nn.Parameter, loaded, shard_id=None) -> None:
        if shard_id is not None or not (self.grouped or self.per_head):
            super()._load(param, loaded, shard_id)  # multi-query rows are q | k | v already
            return
        w = loaded[...]
        kv_heads = self.checkpoint_rows["k"] // self.head_dim
        if self.grouped:  # (kv heads, group + 2, D, ...): each group's q heads, k, v
            w = w.view(kv_heads, -1, self.head_dim, *w.shape[1:])
            q, k, v = w[:, :-2], w[:, -2], w[:, -1]
        else:  # (heads, 3, D, ...)
            w = w.view(kv_heads, 3, self.head_dim, *w.shape[1:])
            q, k, v = w[:, 0], w[:, 1], w[:, 2]
        for shard, part in (("q", q), ("k", k), ("v", v)):
            super()._load(param, part.reshape(-1, *w.shape[3:]), shard)


class FalconAttention(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.query_key_value = FalconQKV(cfg, tp)
        self.dense = RowParallelLinear(cfg.hidden_size, cfg.hidden_size, cfg.bias, tp)
        proj = self.query_key_value
        dim = proj.head_dim
        self.attn = PagedAttention(proj.num_heads, proj.num_kv_heads, dim, scale=dim**-0.5)

    def forward(self, x, positions, cos_sin, meta: AttentionMetadata) -> torch.Tensor:
        proj = self.query_key_value
        q, k, v = proj(x).split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = q.view(-1, proj.num_heads, proj.head_dim)  # (T, Hq, D)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)  # (T, Hkv, D)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        return self.dense(self.attn(q, k, v, positions, cos_sin, meta).flatten(1))


class FalconMLP(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        ffn = getattr(cfg, "ffn_hidden_size", None) or 4 * cfg.hidden_size
        self.dense_h_to_4h = ColumnParallelLinear(cfg.hidden_size, ffn, cfg.bias, tp)
        self.dense_4h_to_h = RowParallelLinear(ffn, cfg.hidden_size, cfg.bias, tp)
        self.act = activation(getattr(cfg, "activation", "gelu"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class FalconDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        size, eps = cfg.hidden_size, cfg.layer_norm_epsilon
        self.self_attention = FalconAttention(cfg, tp)
        self.mlp = FalconMLP(cfg, tp)
        self.parallel = cfg.new_decoder_architecture or cfg.parallel_attn
        norms = getattr(cfg, "num_ln_in_parallel_attn", None) or 2
        self.two_norms = cfg.new_decoder_architecture and norms == 2
        if self.two_norms:
            self.ln_attn = nn.LayerNorm(size, eps=eps)
            self.ln_mlp = nn.LayerNorm(size, eps=eps)
        else:
            self.input_layernorm = nn.LayerNorm(size, eps=eps)
        if not self.parallel:
            self.post_attention_layernorm = nn.LayerNorm(size, eps=eps)

    def forward(self, h, positions, cos_sin, meta) -> torch.Tensor:
        attn_in = self.ln_attn(h) if self.two_norms else self.input_layernorm(h)
        attn = self.self_attention(attn_in, positions, cos_sin, meta)
        if not self.parallel:  # old architecture, sequential
            h = h + attn
            return h + self.mlp(self.post_attention_layernorm(h))
        mlp_in = self.ln_mlp(h) if self.two_norms else attn_in
        return self.mlp(mlp_in) + attn + h


class FalconModel(nn.Module):
    def __init__(self, cfg: Any, tp: ParallelContext) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.h = nn.ModuleList(FalconDecoderLayer(cfg, tp) for _ in range(cfg.num_hidden_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_epsilon)

    def forward(self, input_ids, positions, cos_sin, meta) -> torch.Tensor:
        h = self.word_embeddings(input_ids)
        for layer in self.h:
            h = layer(h, positions, cos_sin, meta)
        return self.ln_f(h)


class FalconForCausalLM(nn.Module):
    packed_modules: dict = {}
    skipped_weights = ("rotary_emb.inv_freq",)

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__()
        if getattr(cfg, "alibi", False):
            raise NotImplementedError(
                "Falcon with ALiBi positions (Falcon-RW) is not supported; rotary Falcon is"
            )
        self.transformer = FalconModel(cfg, tp)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", True))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight
        dim = cfg.hidden_size // cfg.num_attention_heads
        table = cos_sin_cache(dim, max_positions, rope_parameters(cfg))
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.transformer(input_ids, positions, self.cos_sin, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
