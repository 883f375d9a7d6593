"""Torch references of every kernel; the contract each Triton kernel must meet.

Paged KV cache layout, per layer: `k_cache` and `v_cache` of shape
`(num_blocks, block_size, num_kv_heads, head_dim)`. Token position `p` of a sequence lives
in block `block_table[p // block_size]` at offset `p % block_size`; its flat *slot* is
`block * block_size + offset`.

A step's batch is ragged: the query tokens of all sequences are concatenated
(`T` tokens in all). Sequence `i` owns query rows `query_start_loc[i]:query_start_loc[i+1]`;
`seq_lens[i]` is its context length *after* this step's tokens were written, so its query
row `j` (0-based in its chunk) sits at absolute position
`seq_lens[i] - q_len_i + j` and attends causally to key positions `0..that position`, or
with a sliding `window` to the last `window` of them (keys `> position - window`, as
transformers masks them). `softcap` caps the scaled scores at +-softcap through
`softcap * tanh(score / softcap)` before the mask (Gemma-2).

An fp8 cache (`torch.float8_e4m3fn`, one byte an element) holds `x / scale[head]` rounded to
nearest and clamped to +-FP8_MAX (no inf, no NaN, whatever the input), with one fp32 scale
per KV head and layer (`k_scale`, `v_scale`: (Hkv,)); attention reads `fp8 * scale`. The
Triton kernels fold the K scale into the score scale and the V scale into the output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (..., H, D) in any float dtype; scale: (H,) fp32. Returns x / scale in e4m3."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: (..., H, D) in e4m3; scale: (H,). Returns x * scale in fp32."""
    return x.float() * scale[:, None]


def rotate_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half ("neox") layout used by HF llama checkpoints.

    x: (T, H, D); cos, sin: (T, D // 2). Computes in float32, returns x's dtype.
    """
    return _rotate(x, cos.unsqueeze(1).float(), sin.unsqueeze(1).float())


def _rotate(x: torch.Tensor, c: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """`rotate_neox` with c, s already (T, 1, D/2) float32."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
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
    step: dict | None = None,
    *,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> None:
    """Apply rotary to q and k in place, then write k and v into the paged cache.

    q: (T, Hq, D); k, v: (T, Hkv, D); positions: (T,) int; cos_sin_cache: (max_pos, R) with
    cos in the first half and sin in the second, or None for models without rotary (OPT);
    R <= D is the rotary width: only the first R dims of each head turn (partial rotary);
    slot_mapping: (T,) int64, a negative slot means "do not write" (padding rows).
    `step`: a dict that lives for one step, where every layer after the first finds the
    rotary factors and the written rows of the step (None: computed here).
    `k_scale`, `v_scale`: (Hkv,) fp32, the scales of an fp8 cache (None for others).
    """
    step = {} if step is None else step
    if cos_sin_cache is not None:
        key = ("rope", id(cos_sin_cache))
        if key not in step:
            cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
            step[key] = (cos.unsqueeze(1).float(), sin.unsqueeze(1).float())
        c, s = step[key]
        width = cos_sin_cache.shape[1]
        q[..., :width] = _rotate(q[..., :width], c, s)
        k[..., :width] = _rotate(k[..., :width], c, s)
    if "keep" not in step:
        step["keep"] = slot_mapping >= 0 if bool((slot_mapping < 0).any()) else None
    keep = step["keep"]
    if keep is not None:
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    _write_slots(k_cache, slot_mapping, k, k_scale)
    _write_slots(v_cache, slot_mapping, v, v_scale)


def _write_slots(cache, slot_mapping, x, scale) -> None:
    heads, dim = cache.shape[2:]
    if scale is not None:  # index_copy_ has no fp8 kernel on CPU: copy the bytes
        cache, x = cache.view(torch.uint8), quantize_fp8(x, scale).view(torch.uint8)
    cache.view(-1, heads, dim).index_copy_(0, slot_mapping, x.to(cache.dtype))


def _gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """Gather the cached keys (or values) of each sequence: (B, max_len, Hkv, D)."""
    num_blocks, block_size, heads, dim = cache.shape
    used = -(-max_len // block_size)
    ids = block_tables[:, :used].reshape(-1).long()
    raw = cache.view(torch.uint8) if cache.dtype == FP8_DTYPE else cache  # bytes move alike
    # index_select over whole blocks moves memory several times faster than fancy indexing.
    gathered = raw.view(num_blocks, -1).index_select(0, ids)  # (B * used, bs * Hkv * D)
    gathered = gathered.view(cache.dtype)
    return gathered.view(block_tables.shape[0], used * block_size, heads, dim)[:, :max_len]


def _context(cache, tables, max_len) -> torch.Tensor:
    """(B, Hkv, L, D) fp32 keys or values of a group (an fp8 cache's still unscaled)."""
    return _gather_context(cache, tables, max_len).float().transpose(1, 2)


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    layout: list[GroupLayout] | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Ragged paged attention over prompt chunks and decodes of one step.

    q: (T, Hq, D); block_tables: (B, max_blocks) int32; query_start_loc: (B + 1,) int32;
    seq_lens: (B,) int32. Returns (T, Hq, D) in q's dtype. Computes in float32.
    `layout`: what `attention_layout` returns for these arguments and `window` (every layer
    of a step with that window shares it); computed here when None. `k_scale`, `v_scale`:
    (Hkv,) the scales of an fp8 cache.
    """
    out = q.new_empty(q.shape)  # dense, even when q is a strided view of a fused qkv
    if layout is None:
        group_size = q.shape[1] // k_cache.shape[2]
        layout = attention_layout(
            q.shape[0], group_size, block_tables, query_start_loc, seq_lens, window
        )
    scales = (k_scale, v_scale)
    for group in layout:
        _attend_group(q, out, k_cache, v_cache, group, scale, softcap, scales)
    return out


@dataclass(frozen=True)
class GroupLayout:
    """Sequences attended as one padded batch, and everything about them but the cache."""

    batch: int
    max_q: int
    max_len: int
    tables: torch.Tensor  # (B, max_blocks) block tables of the group
    rows: torch.Tensor  # (B, Lq) token row of each query (0 for padding)
    valid: torch.Tensor  # (B, Lq) real queries
    mask: torch.Tensor  # (B, 1, G * Lq, L) causal and length mask, GQA groups folded in
    in_order: bool  # the group is every token of the step, one per sequence, in order


def attention_layout(
    num_tokens: int,
    group_size: int,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    window: int | None = None,
) -> list[GroupLayout]:
    """Decodes run as one padded batch; prompt chunks as another when padding them to the
    longest chunk wastes less than half the work, else one by one. `group_size`: query
    heads per KV head; `window`: the sliding window of the mask (None: causal only)."""
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
    return [
        _group_layout(num_tokens, group_size, block_tables, starts, q_lens, lens, g, window)
        for g in groups
    ]


def _group_layout(num_tokens, group_size, block_tables, starts, q_lens, lens, group, window):
    device = block_tables.device
    batch, max_q = len(group), max(q_lens[i] for i in group)
    max_len = max(lens[i] for i in group)
    j = torch.arange(max_q, device=device)
    start = torch.tensor([starts[i] for i in group], device=device)
    q_len = torch.tensor([q_lens[i] for i in group], device=device)
    seq_len = torch.tensor([lens[i] for i in group], device=device)
    valid = j[None, :] < q_len[:, None]  # (B, Lq)
    rows = torch.where(valid, start[:, None] + j[None, :], 0)  # token row of each query
    q_pos = (seq_len - q_len)[:, None] + j[None, :]  # (B, Lq) absolute positions
    keys = torch.arange(max_len, device=device)[None, None, :]
    mask = keys <= q_pos[:, :, None]  # (B, Lq, L)
    if window is not None:
        mask &= keys > q_pos[:, :, None] - window
    mask = mask[:, None, None].expand(batch, 1, group_size, max_q, max_len)
    # A group that is the whole batch in order (every decode-only step) needs no gather.
    in_order = (batch, max_q) == (num_tokens, 1) and group == list(range(num_tokens))
    return GroupLayout(
        batch=batch,
        max_q=max_q,
        max_len=max_len,
        tables=block_tables[group],
        rows=rows,
        valid=valid,
        mask=mask.reshape(batch, 1, group_size * max_q, max_len),
        in_order=in_order,
    )


def _attend_group(
    q, out, k_cache, v_cache, group: GroupLayout, scale, softcap=None, kv_scales=(None, None)
):
    """Attention of one group's sequences, queries padded to the longest among them. An
    fp8 cache's scales multiply q and the output, as in the kernels: per (head, query), not
    per cached element."""
    batch, max_q = group.batch, group.max_q
    k_scale, v_scale = kv_scales
    k = _context(k_cache, group.tables, group.max_len)
    v = _context(v_cache, group.tables, group.max_len)
    hq, dim = q.shape[1:]
    hkv = k.shape[1]
    g = hq // hkv
    # GQA without copying K and V: fold each KV head's query group into the query axis.
    qg = (q.unsqueeze(1) if group.in_order else q[group.rows]).float()
    qg = qg.view(batch, max_q, hkv, g, dim).permute(0, 2, 3, 1, 4)
    qg = qg.reshape(batch, hkv, g * max_q, dim)  # (B, Hkv, G*Lq, D)
    if k_scale is not None:  # q . (k * s) == (q * s) . k
        qg = qg * k_scale.view(1, hkv, 1, 1)
    if softcap is None:
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=group.mask, scale=scale)
    else:
        scores = qg @ k.transpose(-1, -2) * scale  # (B, Hkv, G*Lq, L)
        scores = softcap * torch.tanh(scores / softcap)
        o = scores.masked_fill(~group.mask, float("-inf")).softmax(-1) @ v
    if v_scale is not None:
        o = o * v_scale.view(1, hkv, 1, 1)
    o = o.view(batch, hkv, g, max_q, dim).permute(0, 3, 1, 2, 4).reshape(batch, max_q, hq, dim)
    if group.in_order:
        out.copy_(o.squeeze(1))
    else:
        out[group.rows[group.valid]] = o[group.valid].to(out.dtype)


class SplitSums(NamedTuple):
    """A split-K GEMV's y (M, N) left as its partial sums (kernels/gemv.py,
    `gemv(..., defer=True)`): y = (partials[0] + ... + partials[S-1]) * scale + bias in
    float32, cast once to `dtype`.
    A kernel that reads y takes these instead (kernels/split_k.py `split_sums`: the same bits);
    the GEMV skips its epilogue: the last split's arrival counter, its reload of the
    partials and its store, a chain of round trips at the end of every split GEMV.
    `partials` is a cached workspace of the call's shape: read it before the next deferred
    GEMV of that shape."""

    partials: torch.Tensor  # (S, M, N) float32
    scale: torch.Tensor | None  # (N,) float32 (float8 weights)
    bias: torch.Tensor | None  # (N,)
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.partials.shape[1:]

    def total(self) -> torch.Tensor:
        """y as the GEMV would have stored it (torch, the splits added in order)."""
        acc = self.partials[0].clone()
        for part in self.partials[1:]:
            acc += part
        if self.scale is not None:
            acc = acc * self.scale
        if self.bias is not None:
            acc = acc + self.bias.float()
        return acc.to(self.dtype)


class Pushed(NamedTuple):
    """A row-parallel projection's rows on this rank (its part of their sum over the group)
    that the GEMV making them sent to every peer already (kernels/gemv.py,
    `gemv(..., push=buffers)`). The RMSNorm after the projection completes the all-reduce
    (kernels/all_reduce.py `one_shot_all_reduce_norm(y, ..., buffers, pushed=True)`)."""

    y: torch.Tensor
    buffers: Any  # kernels/all_reduce.py PeerBuffers

    @property
    def shape(self) -> torch.Size:
        return self.y.shape


def rms_norm_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm, rounded as HF llama rounds it.

    Returns (normed, new_residual) with new_residual = x + residual (or x when residual is
    None), added in x's dtype; the norm computes in float32 and casts back before the weight.
    `unit_offset` (Gemma): the scale is `1 + weight`, applied in float32 before the cast.
    """
    hidden = x if residual is None else x + residual
    h32 = hidden.float()
    normed = h32 * torch.rsqrt(h32.pow(2).mean(-1, keepdim=True) + eps)
    if unit_offset:
        return (normed * (1.0 + weight.float())).to(x.dtype), hidden
    return weight * normed.to(x.dtype), hidden


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (T, 2I) holding [gate | up]; returns silu(gate) * up, (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """x: (T, 2I) holding [gate | up]; returns gelu(gate) * up with GELU's tanh
    approximation (GeGLU of Gemma), (T, I)."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
