"""The llama family in one implementation: Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma and
Phi-3 (and, with its own decoder layer, Gemma-2: models/gemma2.py).

Differences are configuration (models/family.py): GQA head counts, rope scaling (llama3,
Phi-3's longrope), partial rotary, q/k/v biases (Qwen2), q/k norms (Qwen3), sliding
windows (Mistral, Qwen2's use_sliding_window), Gemma's norm and embedding scales and GeGLU,
tied embeddings (small Llama 3.2 and Qwen2 checkpoints, Gemma), fused q/k/v and gate/up
weights in the checkpoint (Phi-3: the loaders split them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from mii.engine.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from mii.engine.layers.norm import RMSNorm
from mii.engine.layers.rotary import cos_sin_cache, long_prompt_rope, rope_parameters
from mii.engine.models.family import Family
from mii.engine.tp.context import ParallelContext


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, fam: Family, layer: int, tp: ParallelContext) -> None:
        super().__init__()
        dim = fam.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, dim, cfg.num_attention_heads, fam.num_kv_heads, fam.qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * dim, cfg.hidden_size, fam.out_bias, tp
        )
        self.q_norm = self.k_norm = None
        if fam.qk_norm:
            self.q_norm = RMSNorm(dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(dim, cfg.rms_norm_eps)
        heads, kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.attn = PagedAttention(
            heads, kv_heads, dim, fam.attn_scale, fam.windows[layer], fam.attn_softcap
        )

    def forward(self, x, positions, cos_sin, meta: AttentionMetadata, reduce=True) -> torch.Tensor:
        """`reduce=False`: the output projection's partial sums, not yet all-reduced."""
        qkv = self.qkv_proj(x)
        proj = self.qkv_proj
        q, k, v = qkv.split([proj.q_size, proj.kv_size, proj.kv_size], dim=-1)
        q = q.view(-1, proj.num_heads, proj.head_dim)  # (T, Hq, D)
        k = k.view(-1, proj.num_kv_heads, proj.head_dim)  # (T, Hkv, D)
        v = v.view(-1, proj.num_kv_heads, proj.head_dim)
        if self.q_norm is not None:  # per head, before rotary
            q = self.q_norm(q)[0].view(q.shape)
            k = self.k_norm(k)[0].view(k.shape)
        out = self.attn(q, k, v, positions, cos_sin, meta)  # (T, Hq, D)
        return self.o_proj(out.flatten(1), reduce=reduce)


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, fam: Family, tp: ParallelContext) -> None:
        super().__init__()
        size = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [size, size], fam.mlp_bias, tp
        )
        self.down_proj = RowParallelLinear(size, cfg.hidden_size, fam.mlp_bias, tp)
        self.activation = fam.activation  # Family refuses the ones we cannot run

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        # The activation inside the down projection: one-row GPU steps fold it into the GEMV.
        return self.down_proj.forward_gated(self.gate_up_proj(x), self.activation, reduce)


def gemv_push(tp: ParallelContext, norm: RMSNorm) -> Any:
    """The push buffers for a row-parallel projection whose partial sums go to `norm`'s
    `after_all_reduce` (`LinearBase.push_to`), or None."""
    if tp.peer is None or norm.unit_offset:
        return None
    return tp.peer.gemv_push


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP with residuals. The all-reduces of the row-parallel output
    and down projections are left to the norms after them (`RMSNorm.after_all_reduce`: one
    launch with the one-shot peer all-reduce): the post-attention norm's in this layer; the
    MLP's to the next layer's input norm or the model's final norm (`partial_out`, set by
    LlamaModel where the next one takes it)."""

    partial_in = False  # h arrives as partial sums (the layer before left its all-reduce)
    partial_out = False  # the MLP's output leaves as partial sums

    def __init__(self, cfg: Any, fam: Family, layer: int, tp: ParallelContext) -> None:
        super().__init__()
        self.tp = tp
        self.self_attn = LlamaAttention(cfg, fam, layer, tp)
        self.mlp = self.build_mlp(cfg, fam, layer, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.gemma_norm)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.gemma_norm)
        self.attn_partial = self.self_attn.o_proj.bias is None
        # On one rank the post-attention norm adds up the output GEMV's split sums itself; on
        # several, the output GEMV may send its rows to the peers for that norm.
        self.self_attn.o_proj.defer_splits = self.attn_partial and tp.world_size == 1
        if self.attn_partial:
            self.self_attn.o_proj.push_to = gemv_push(tp, self.post_attention_layernorm)

    @property
    def mlp_in(self) -> nn.Module | None:
        """The MLP's first linear layer, the only reader of its input (experts: none)."""
        return self.mlp.gate_up_proj if isinstance(self.mlp, LlamaMLP) else None

    @property
    def can_leave_mlp_partial(self) -> bool:
        return isinstance(self.mlp, LlamaMLP) and self.mlp.down_proj.bias is None

    def build_mlp(self, cfg: Any, fam: Family, layer: int, tp: ParallelContext) -> nn.Module:
        """The layer's MLP; the mixture-of-experts models (models/moe.py) build theirs."""
        return LlamaMLP(cfg, fam, tp)

    def forward(self, h, residual, positions, cos_sin, meta):
        # The normed rows go to one linear layer each (FP8 ones take them quantized).
        qkv_proj, mlp_in = self.self_attn.qkv_proj, self.mlp_in
        if self.partial_in:
            normed, residual = self.input_layernorm.after_all_reduce(h, residual, self.tp, qkv_proj)
        else:
            normed, residual = self.input_layernorm(h, residual, qkv_proj)
        h = self.self_attn(normed, positions, cos_sin, meta, reduce=not self.attn_partial)
        norm = self.post_attention_layernorm
        if self.attn_partial:
            normed, residual = norm.after_all_reduce(h, residual, self.tp, mlp_in)
        else:
            normed, residual = norm(h, residual, mlp_in)
        if self.partial_out:
            return self.mlp(normed, reduce=False), residual
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: Any, fam: Family, tp: ParallelContext, layer_cls: type) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.embed_scale = None
        if fam.embed_scale is not None:  # rounded to the weights' dtype, as transformers does
            dtype = torch.get_default_dtype()  # the model's dtype while it is built
            self.embed_scale = float(torch.tensor(fam.embed_scale, dtype=dtype, device="cpu"))
        self.layers = nn.ModuleList(
            layer_cls(cfg, fam, i, tp) for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, fam.gemma_norm)
        self.tp = tp
        self.partial_final = self._leave_mlp_reduces_to_the_next_norm()

    def _leave_mlp_reduces_to_the_next_norm(self) -> bool:
        """A layer whose MLP can leave its all-reduce does so where what follows takes partial
        sums (a llama layer's input norm, the final norm); True if the last one did. On one
        rank that norm adds up the down projection's split sums too (`defer_splits`)."""
        layers = list(self.layers)
        for i, layer in enumerate(layers):
            after = layers[i + 1] if i + 1 < len(layers) else None
            if getattr(layer, "can_leave_mlp_partial", False) and (
                after is None or isinstance(after, LlamaDecoderLayer)
            ):
                layer.partial_out = True
                layer.mlp.down_proj.defer_splits = self.tp.world_size == 1
                norm = self.norm if after is None else after.input_layernorm
                layer.mlp.down_proj.push_to = gemv_push(self.tp, norm)
                if after is not None:
                    after.partial_in = True
        return bool(layers) and getattr(layers[-1], "partial_out", False)

    def forward(self, input_ids, positions, cos_sin, meta) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        if self.embed_scale is not None:
            h = h * self.embed_scale
        for layer in self.layers:
            h, residual = layer(h, residual, positions, cos_sin, meta)
        if self.partial_final:
            return self.norm.after_all_reduce(h, residual, self.tp)[0]
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
    decoder_layer: type[nn.Module] = LlamaDecoderLayer

    def __init__(self, cfg: Any, tp: ParallelContext, max_positions: int) -> None:
        super().__init__()
        fam = Family.of(cfg)
        self.model = LlamaModel(cfg, fam, tp, self.decoder_layer)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        self.final_softcap = fam.final_softcap
        self.tie_word_embeddings = bool(getattr(cfg, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        rope = rope_parameters(cfg)
        self.long_prompt_rope = long_prompt_rope(rope, max_positions)
        table = cos_sin_cache(fam.rotary_dim, max_positions, rope)
        self.register_buffer("cos_sin", table, persistent=False)

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.cos_sin, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        if self.final_softcap is not None:  # Gemma-2
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits
