"""Attention over the paged KV cache, and the per-step metadata that drives it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mii.kernels import dispatch


@dataclass
class AttentionMetadata:
    """Where one step's tokens sit in the paged cache (see mii/kernels/torch_ref.py)."""

    slot_mapping: torch.Tensor  # (T,) int64
    block_tables: torch.Tensor  # (B, max_blocks) int32
    query_start_loc: torch.Tensor  # (B + 1,) int32
    seq_lens: torch.Tensor  # (B,) int32
    max_query_len: int
    max_seq_len: int
    num_decodes: int = 0
    """Leading sequences of one query token in a mixed step (the scheduler puts decodes
    first); with `prompts` the CUDA path attends over them apart (kernels/
    paged_attention.py)."""
    prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """The other sequences' block tables, query_start_loc from 0 and seq_lens
    (`dispatch.split_prompts`)."""
    step: dict = field(default_factory=dict, repr=False, compare=False)
    """What every layer of this step shares on the torch path (rotary factors, attention
    layout): the first layer computes it, the others find it here."""

    @classmethod
    def one_sequence(cls, tokens: int, block_size: int, device) -> AttentionMetadata:
        """A prefill of `tokens` tokens in blocks 0, 1, ... (start-up passes over a scratch
        cache)."""
        blocks = -(-tokens // block_size)
        return cls(
            slot_mapping=torch.arange(tokens, dtype=torch.int64, device=device),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=device)[None],
            query_start_loc=torch.tensor([0, tokens], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([tokens], dtype=torch.int32, device=device),
            max_query_len=tokens,
            max_seq_len=tokens,
        )

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class PagedAttention(nn.Module):
    """Writes this step's keys and values into the cache (rotating q and k on the way when
    the model uses rotary embeddings), then attends over each sequence's cached context:
    all of it, or its last `window` tokens (sliding-window layers); `softcap` soft-caps the
    scores (Gemma-2). An fp8 cache comes with its per-head scales (see `bind_cache`)."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.window, self.softcap = window, softcap
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None

    def bind_cache(
        self,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
    ) -> None:
        """The layer's cache, (blocks, block_size, Hkv, D) each; an fp8 cache's (Hkv,) fp32
        scales, which the kernels read from these tensors at every step (CUDA graphs too)."""
        self.k_cache, self.v_cache = k_cache, v_cache
        self.k_scale, self.v_scale = k_scale, v_scale

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """q: (T, Hq, D); k, v: (T, Hkv, D). Returns (T, Hq, D)."""
        scales = {"k_scale": self.k_scale, "v_scale": self.v_scale}
        dispatch.rope_kv_write(
            q, k, v, positions, cos_sin, self.k_cache, self.v_cache, meta.slot_mapping, meta.step,
            **scales,
        )  # fmt: skip
        return dispatch.paged_attention(
            q,
            self.k_cache,
            self.v_cache,
            meta.block_tables,
            meta.query_start_loc,
            meta.seq_lens,
            self.scale,
            max_query_len=meta.max_query_len,
            num_decodes=meta.num_decodes,
            prompts=meta.prompts,
            step=meta.step,
            window=self.window,
            softcap=self.softcap,
            **scales,
        )
