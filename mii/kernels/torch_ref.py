"""Torch references of every kernel; the contract each Triton kernel must meet.

Paged KV cache layout, per layer: `k_cache` and `v_cache` of shape
`(num_blocks, block_size, num_kv_heads, head_dim)`. Token position `p` of a sequence lives
in block `block_table[p // block_size]` at offset `p % block_size`; its flat *slot* is
`block * block_size + offset`.

A step's batch is ragged: the query tokens of all sequences are concatenated
(`T` tokens in all). Sequence `i` owns query rows `query_start_loc[i]:query_start_loc[i+1]`;
`seq_lens[i]` is its context length *after* this step's tokens were written, so its query
row `j` (0-based in its chunk) sits at absolute position
`seq_lens[i] - q_len_i + j` and attends causally to key positions `0..that position`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half ("neox") layout used by HF llama checkpoints.

    x: (T, H, D); cos, sin: (T, D // 2).
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    c, s = cos.unsqueeze(1).float(), sin.unsqueeze(1).float()  # (T, 1, D/2)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)


def rope_kv_write_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Apply rotary to q and k in place, then write k and v into the paged cache.

    q: (T, Hq, D); k, v: (T, Hkv, D); positions: (T,) int; cos_sin_cache: (max_pos, D) with
    cos in the first half and sin in the second, or None for models without rotary (OPT);
    slot_mapping: (T,) int64, a negative slot means "do not write" (padding rows).
    """
    if cos_sin_cache is not None:
        cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
        q.copy_(rotate_neox(q, cos, sin))
        k.copy_(rotate_neox(k, cos, sin))
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_cache.shape[1]
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather the cached keys (or values) of each sequence: (B, max_len, Hkv, D)."""
    num_blocks = -(-max_len // cache.shape[1])
    gathered = cache[block_tables[:, :num_blocks].long()]  # (B, nb, bs, Hkv, D)
    batch, nb, bs, heads, dim = gathered.shape
    return gathered.reshape(batch, nb * bs, heads, dim)[:, :max_len]


def _attend(q, k, v, mask, scale):
    """q: (B, Hq, Lq, D); k, v: (B, Hkv, Lk, D); mask: (B, 1, Lq, Lk) bool (True = attend)."""
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Ragged paged attention over prompt chunks and decodes of one step.

    q: (T, Hq, D); block_tables: (B, max_blocks) int32; query_start_loc: (B + 1,) int32;
    seq_lens: (B,) int32. Returns (T, Hq, D) in q's dtype. Computes in float32.
    Decode rows (one query token) are batched into one call; each prompt chunk is its own.
    """
    out = q.new_empty(q.shape)  # dense, even when q is a strided view of a fused qkv
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    if decodes:
        rows = torch.tensor([starts[i] for i in decodes], device=q.device)
        out[rows] = _decode_ref(
            q[rows], k_cache, v_cache, block_tables[decodes], seq_lens[decodes], scale
        )
    for i, n in enumerate(q_lens):
        if n > 1:
            sl = slice(starts[i], starts[i + 1])
            out[sl] = _chunk_ref(q[sl], k_cache, v_cache, block_tables[i], lens[i], scale)
    return out


def _decode_ref(q, k_cache, v_cache, block_tables, seq_lens, scale):
    max_len = int(seq_lens.max())
    k = _gather_context(k_cache, block_tables, max_len).float().transpose(1, 2)  # (B, Hkv, L, D)
    v = _gather_context(v_cache, block_tables, max_len).float().transpose(1, 2)
    key_pos = torch.arange(max_len, device=q.device)
    mask = (key_pos[None, :] < seq_lens[:, None].to(q.device))[:, None, None, :]  # (B,1,1,L)
    out = _attend(q.float().unsqueeze(2), k, v, mask, scale)  # (B, Hq, 1, D)
    return out.squeeze(2).to(q.dtype)


def _chunk_ref(q, k_cache, v_cache, block_table, seq_len, scale):
    q_len = q.shape[0]
    k = _gather_context(k_cache, block_table[None], seq_len).float().transpose(1, 2)
    v = _gather_context(v_cache, block_table[None], seq_len).float().transpose(1, 2)
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
    key_pos = torch.arange(seq_len, device=q.device)
    mask = (key_pos[None, :] <= q_pos[:, None])[None, None]  # (1, 1, Lq, Lk)
    out = _attend(q.float().transpose(0, 1).unsqueeze(0), k, v, mask, scale)  # (1, Hq, Lq, D)
    return out[0].transpose(0, 1).to(q.dtype)


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, rounded as HF llama rounds it.

    Returns (normed, new_residual) with new_residual = x + residual (or x when residual is
    None), added in x's dtype; the norm computes in float32 and casts back before the weight.
    """
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype), hidden


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (T, 2I) holding [gate | up]; returns silu(gate) * up, (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
