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

    x: (T, H, D); cos, sin: (T, D // 2). Computes in float32, returns x's dtype.
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
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    heads, dim = k_cache.shape[2:]
    k_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, heads, dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather the cached keys (or values) of each sequence: (B, max_len, Hkv, D)."""
    num_blocks, block_size, heads, dim = cache.shape
    used = -(-max_len // block_size)
    ids = block_tables[:, :used].reshape(-1).long()
    # index_select over whole blocks moves memory several times faster than fancy indexing.
    gathered = cache.view(num_blocks, -1).index_select(0, ids)  # (B * used, bs * Hkv * D)
    return gathered.view(block_tables.shape[0], used * block_size, heads, dim)[:, :max_len]


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
    Decodes run as one padded batch; prompt chunks as another when padding them to the
    longest chunk wastes less than half the work, else one by one.
    """
    out = q.new_empty(q.shape)  # dense, even when q is a strided view of a fused qkv
    starts = query_start_loc.tolist()
    q_lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
    decodes = [i for i, n in enumerate(q_lens) if n == 1]
    chunks = [i for i, n in enumerate(q_lens) if n > 1]
    groups = [decodes] if decodes else []
    if chunks and 2 * sum(q_lens[i] for i in chunks) >= len(chunks) * max(q_lens):
        groups.append(chunks)
    else:
        groups.extend([i] for i in chunks)
    lens = seq_lens.tolist()
    for group in groups:
        _attend_group(q, out, k_cache, v_cache, block_tables, starts, q_lens, lens, group, scale)
    return out


def _attend_group(q, out, k_cache, v_cache, block_tables, starts, q_lens, lens, group, scale):
    """Attention of the sequences in `group`, queries padded to the longest among them."""
    device = q.device
    batch, max_q = len(group), max(q_lens[i] for i in group)
    max_len = max(lens[i] for i in group)
    j = torch.arange(max_q, device=device)
    start = torch.tensor([starts[i] for i in group], device=device)
    q_len = torch.tensor([q_lens[i] for i in group], device=device)
    seq_len = torch.tensor([lens[i] for i in group], device=device)
    valid = j[None, :] < q_len[:, None]  # (B, Lq)
    rows = torch.where(valid, start[:, None] + j[None, :], 0)  # token row of each query
    q_pos = (seq_len - q_len)[:, None] + j[None, :]  # (B, Lq) absolute positions
    mask = torch.arange(max_len, device=device)[None, None, :] <= q_pos[:, :, None]  # (B,Lq,L)
    tables = block_tables[group]
    k = _gather_context(k_cache, tables, max_len).float().transpose(1, 2)  # (B, Hkv, L, D)
    v = _gather_context(v_cache, tables, max_len).float().transpose(1, 2)
    hq, dim = q.shape[1:]
    hkv = k.shape[1]
    g = hq // hkv
    # GQA without copying K and V: fold each KV head's query group into the query axis.
    # A group that is the whole batch in order (every decode-only step) needs no gather.
    in_order = rows.shape == (q.shape[0], 1) and group == list(range(q.shape[0]))
    qg = (q.unsqueeze(1) if in_order else q[rows]).float().view(batch, max_q, hkv, g, dim)
    qg = qg.permute(0, 2, 3, 1, 4).reshape(batch, hkv, g * max_q, dim)  # (B, Hkv, G*Lq, D)
    mask = mask[:, None, None].expand(batch, 1, g, max_q, max_len)
    o = F.scaled_dot_product_attention(
        qg, k, v, attn_mask=mask.reshape(batch, 1, g * max_q, max_len), scale=scale
    )
    o = o.view(batch, hkv, g, max_q, dim).permute(0, 3, 1, 2, 4).reshape(batch, max_q, hq, dim)
    if in_order:
        out.copy_(o.squeeze(1))
    else:
        out[rows[valid]] = o[valid].to(out.dtype)


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
