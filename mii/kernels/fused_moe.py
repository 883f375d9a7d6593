"""Fused mixture-of-experts: routing, tokens sorted by expert, two grouped GEMMs.

Three launches per layer, none of which waits for the host (CUDA graphs capture them):

1. `_route_kernel`, one program: each token's top-k experts and weights from the router
   logits (as `fused_moe_ref.route_ref`), then the (token, slot) entries `t * k + j` sorted
   by expert into `sorted_ids`, each expert's run padded to a multiple of BLOCK_M. Per row
   block b, `block_expert[b]` is its expert and `block_rows[b]` how many of its rows are
   real entries (0 for blocks past the last expert). The host only knows a bound on the
   blocks: sum_e ceil(n_e / BLOCK_M) <= (T*k + min(E, T*k) * (BLOCK_M - 1)) / BLOCK_M, so
   the GEMM grids cover that many and the programs of unused blocks return at once.
   Its tiles hold ROUTE_TILE (token, expert) pairs, so that many experts mean fewer
   tokens a tile (`route_tiles`).
2. `_gate_up_kernel`: per row block and column tile, the block's tokens gathered from x
   times its expert's gate rows and up rows (two accumulators over one K loop); silu(gate)
   * up is stored in sorted order into `h` (padded rows, I).
3. `_down_kernel`: h's row blocks times the expert's down weights, each row scaled by its
   routing weight and stored at its entry `t * k + j`; the k rows of each token are then
   summed (one torch reduction, which accumulates in float32).

Weights are laid out as in fused_moe_ref: gate_up (E, 2I, H), down (E, H, I), in x's
dtype, or in float8 e4m3 with one float32 scale per expert and output row (`scales`:
gate_up's (E, 2I), down's (E, H)): each weight tile is converted to x's dtype in registers
and the row scales applied to the float32 sums (weight-only FP8, as kernels/fp8_gemm.py's
weight-only mode): half the bytes a decode step reads.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.fused_moe_ref import ExpertScales, check_expert_weights


class GemmTile(NamedTuple):
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


class MoeConfig(NamedTuple):
    block_m: int
    gate_up: GemmTile
    down: GemmTile
    group_m: int = 8


class SortedRouting(NamedTuple):
    weights: torch.Tensor  # (T, k) float32
    experts: torch.Tensor  # (T, k) int32
    sorted_ids: torch.Tensor  # (blocks * block_m,) int32 entries t*k+j; padding unset
    block_expert: torch.Tensor  # (blocks,) int32
    block_rows: torch.Tensor  # (blocks,) int32 real rows of each block, 0 if unused
    block_m: int


def moe_config(num_tokens: int, top_k: int, num_experts: int) -> MoeConfig:
    """Tiles by the mean rows per expert, from decode (a row or two per expert: narrow
    blocks, memory bound, many column tiles to spread the weight reads) to prefill (rows of
    128, compute bound). Shapes after vLLM's tuned Mixtral tables for H100, with gate_up's
    column tile halved because it carries two accumulators; scripts/bench_moe.py sweeps
    alternatives."""
    rows = num_tokens * top_k / num_experts
    if rows <= 8:
        return MoeConfig(16, GemmTile(64, 128, 4, 4), GemmTile(64, 128, 4, 4))
    if rows <= 24:
        return MoeConfig(32, GemmTile(64, 128, 4, 4), GemmTile(128, 128, 4, 4))
    if rows <= 96:
        return MoeConfig(64, GemmTile(64, 128, 4, 3), GemmTile(128, 128, 4, 3))
    return MoeConfig(128, GemmTile(128, 64, 8, 3), GemmTile(256, 64, 8, 3))


SHARED_MEMORY = 200 * 1024  # bytes of pipelined tiles a program may hold (H100: 227 KB)


def fit_shared_memory(tile: GemmTile, block_m: int, weight_tiles: int, itemsize: int) -> GemmTile:
    """Fewer stages, then narrower K tiles, until the pipelined operand tiles fit: float32
    (the tests) doubles the bytes that the bf16 tiles were chosen for. `weight_tiles`: the
    weight tiles a stage loads (gate_up: 2)."""
    while tile.num_stages > 1 and tile.block_k > 16:
        per_stage = (block_m + weight_tiles * tile.block_n) * tile.block_k * itemsize
        if per_stage * tile.num_stages <= SHARED_MEMORY:
            break
        if tile.num_stages > 2:
            tile = tile._replace(num_stages=tile.num_stages - 1)
        else:
            tile = tile._replace(block_k=tile.block_k // 2)
    return tile


def max_blocks(num_tokens: int, top_k: int, num_experts: int, block_m: int) -> int:
    entries = num_tokens * top_k
    return triton.cdiv(entries + min(num_experts, entries) * (block_m - 1), block_m)


# ---- routing ---------------------------------------------------------------------------

# (token, expert) pairs in one tile of the routing program: 16 a thread at 4 warps. Its
# tensors were (256, 64) for 60 experts once, 128 a thread each: ptxas spilled some 2,000
# registers and took about 70 s to compile each specialisation (the GPU tests timed out),
# and 1000 tokens took 4.1 ms to route. At (32, 64): no spills, a few seconds, 0.8 ms
# (H200, triton 3.6). 4096 pairs spilled again and were no faster.
ROUTE_TILE = 2048


class RouteTiles(NamedTuple):
    block_t: int  # tokens a tile of the top-k passes
    block_e: int  # experts, padded to a power of two
    block_b: int  # row blocks a tile of the block-owner pass


def route_tiles(num_tokens: int, num_experts: int) -> RouteTiles:
    block_e = max(2, triton.next_power_of_2(num_experts))
    rows = max(1, ROUTE_TILE // block_e)
    return RouteTiles(min(rows, 256, triton.next_power_of_2(num_tokens)), block_e, rows)


@triton.jit
def _load_logits(logits_ptr, rows, row_ok, cols, col_ok, stride):
    """(BLOCK_T, BLOCK_E) float32 logits, -inf in the padding columns."""
    ptrs = logits_ptr + rows[:, None] * stride + cols[None, :]
    logits = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    return tl.where(col_ok[None, :], logits, float("-inf"))


@triton.jit
def _top_k_norm(logits, probs, cols, TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """What each row's weights divide by: the sum of all its exp(logit - max), or of its
    top k ones."""
    if RENORMALIZE:
        norm = tl.zeros((logits.shape[0],), dtype=tl.float32)
        for _ in tl.static_range(TOP_K):
            hit = cols[None, :] == tl.argmax(logits, axis=1)[:, None]
            norm += tl.sum(tl.where(hit, probs, 0.0), axis=1)
            logits = tl.where(hit, float("-inf"), logits)
    else:
        norm = tl.sum(probs, axis=1)
    return norm


@triton.jit
def _route_kernel(
    logits_ptr, weights_ptr, experts_ptr, sorted_ids_ptr, block_expert_ptr, block_rows_ptr,
    num_tokens, num_experts, num_blocks, stride_logits,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts
    # Pass 1: top-k, weights, and how many entries each expert gets.
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for first in range(0, num_tokens, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        logits = _load_logits(logits_ptr, rows, row_ok, cols, col_ok, stride_logits)
        probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])  # unnormalised softmax
        norm = _top_k_norm(logits, probs, cols, TOP_K, RENORMALIZE)
        for j in tl.static_range(TOP_K):
            expert = tl.argmax(logits, axis=1)
            hit = cols[None, :] == expert[:, None]
            weight = tl.sum(tl.where(hit, probs, 0.0), axis=1) / norm
            tl.store(weights_ptr + rows * TOP_K + j, weight, mask=row_ok)
            tl.store(experts_ptr + rows * TOP_K + j, expert.to(tl.int32), mask=row_ok)
            counts += tl.sum((hit & row_ok[:, None]).to(tl.int32), axis=0)
            logits = tl.where(hit, float("-inf"), logits)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    # Each row block's expert: the first whose padded run ends after the block's first
    # row (empty experts end where they start and are passed over).
    for first in range(0, num_blocks, BLOCK_B):
        blocks = first + tl.arange(0, BLOCK_B)
        row0 = blocks * BLOCK_M
        expert = tl.sum((ends[None, :] <= row0[:, None]).to(tl.int32), axis=1)
        hit = cols[None, :] == expert[:, None]
        real_end = tl.sum(tl.where(hit, (starts + counts)[None, :], 0), axis=1)
        rows = tl.minimum(tl.maximum(real_end - row0, 0), BLOCK_M)
        rows = tl.where(expert < num_experts, rows, 0)
        block_ok = blocks < num_blocks
        tl.store(block_expert_ptr + blocks, tl.where(rows > 0, expert, 0), mask=block_ok)
        tl.store(block_rows_ptr + blocks, rows, mask=block_ok)
    # Pass 2: each entry's place, its expert's next free row. The top-k is recomputed (the
    # same arithmetic as pass 1) rather than read back from what other threads stored.
    cursor = starts
    for first in range(0, num_tokens, BLOCK_T):
        rows = first + tl.arange(0, BLOCK_T)
        row_ok = rows < num_tokens
        logits = _load_logits(logits_ptr, rows, row_ok, cols, col_ok, stride_logits)
        for j in tl.static_range(TOP_K):
            expert = tl.argmax(logits, axis=1)
            hit = cols[None, :] == expert[:, None]
            ones = (hit & row_ok[:, None]).to(tl.int32)
            earlier = tl.cumsum(ones, axis=0) - ones  # same-expert entries above in this tile
            place = tl.sum(ones * (cursor[None, :] + earlier), axis=1)
            tl.store(sorted_ids_ptr + place, (rows * TOP_K + j).to(tl.int32), mask=row_ok)
            cursor += tl.sum(ones, axis=0)
            logits = tl.where(hit, float("-inf"), logits)


def route(logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int) -> SortedRouting:
    """Top-k routing and the sort by expert; logits: (T, E) in any float dtype."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits: (T, E), dense rows"
    assert logits.dtype in (torch.float32, torch.float16, torch.bfloat16)
    tokens, experts = logits.shape
    assert 1 <= top_k <= experts, f"top_k {top_k} of {experts} experts"
    assert block_m >= 16 and block_m & (block_m - 1) == 0, "block_m: a power of two >= 16"
    blocks = max_blocks(tokens, top_k, experts, block_m)
    dev, i32 = logits.device, torch.int32
    out = SortedRouting(
        weights=torch.empty((tokens, top_k), dtype=torch.float32, device=dev),
        experts=torch.empty((tokens, top_k), dtype=i32, device=dev),
        sorted_ids=torch.empty(blocks * block_m, dtype=i32, device=dev),
        block_expert=torch.empty(blocks, dtype=i32, device=dev),
        block_rows=torch.empty(blocks, dtype=i32, device=dev),
        block_m=block_m,
    )
    if tokens == 0:
        return out
    tiles = route_tiles(tokens, experts)
    _route_kernel[(1,)](
        logits, out.weights, out.experts, out.sorted_ids, out.block_expert, out.block_rows,
        tokens, experts, blocks, logits.stride(0),
        TOP_K=top_k, RENORMALIZE=renormalize, BLOCK_M=block_m, BLOCK_T=tiles.block_t,
        BLOCK_E=tiles.block_e, BLOCK_B=tiles.block_b, num_warps=4,
    )  # fmt: skip
    return out


# ---- the two grouped GEMMs -------------------------------------------------------------


@triton.jit
def _tile(num_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """(row block, column tile) of this program, GROUP_M row blocks sharing each column
    tile side by side, so that a weight tile read once serves all of them from L2."""
    pid = tl.program_id(0)
    width = GROUP_M * num_n_tiles
    first_m = (pid // width) * GROUP_M
    size = tl.minimum(num_blocks - first_m, GROUP_M)
    return first_m + (pid % width) % size, (pid % width) // size


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, scale_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr, block_rows_ptr,
    num_blocks, inner, hidden, stride_xm, stride_we, stride_wn, stride_se, stride_hm,
    TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    PRECISION: tl.constexpr, W_SCALED: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(num_blocks, tl.cdiv(inner, BLOCK_N), GROUP_M)
    real_rows = tl.load(block_rows_ptr + pid_m)
    if real_rows == 0:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < real_rows
    token = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0) // TOP_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inner
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + token.to(tl.int64)[:, None] * stride_xm + offs_k[None, :]  # (BM, BK)
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    up = inner * stride_wn  # the up rows follow the gate rows
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            u = tl.load(g_ptrs + up, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < hidden - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(g_ptrs + up, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = tl.dot(a, g.to(a.dtype), acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u.to(a.dtype), acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
    if W_SCALED:  # float8 weights: each output row's scale on its float32 sum
        s_ptrs = scale_ptr + expert * stride_se + offs_n
        acc_g = acc_g * tl.load(s_ptrs, mask=n_ok, other=0.0)[None, :]
        acc_u = acc_u * tl.load(s_ptrs + inner, mask=n_ok, other=0.0)[None, :]
    # Rounded as the reference rounds: the projections, silu(gate), then the product.
    dtype = h_ptr.dtype.element_ty
    gate = acc_g.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    h = (act * acc_u.to(dtype).to(tl.float32)).to(dtype)
    h_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, scale_ptr, out_ptr, sorted_ids_ptr, weights_ptr, block_expert_ptr,
    block_rows_ptr, num_blocks, hidden, inner, stride_hm, stride_we, stride_wn, stride_se,
    stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    W_SCALED: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = _tile(num_blocks, tl.cdiv(hidden, BLOCK_N), GROUP_M)
    real_rows = tl.load(block_rows_ptr + pid_m)
    if real_rows == 0:
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = tl.arange(0, BLOCK_M) < real_rows
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_m[:, None] * stride_hm + offs_k[None, :]  # (BM, BK)
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < inner - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b.to(a.dtype), acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if W_SCALED:
        acc = acc * tl.load(scale_ptr + expert * stride_se + offs_n, mask=n_ok, other=0.0)[None, :]
    entry = tl.load(sorted_ids_ptr + offs_m, mask=row_ok, other=0)
    weight = tl.load(weights_ptr + entry, mask=row_ok, other=0.0)
    dtype = out_ptr.dtype.element_ty
    y = acc.to(dtype).to(tl.float32) * weight[:, None]  # the projection rounded, then scaled
    out_ptrs = out_ptr + entry.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(dtype), mask=row_ok[:, None] & n_ok[None, :])


def expert_gemms(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    routing: SortedRouting,
    config: MoeConfig,
    scales: ExpertScales | None = None,
    sum_top_k: bool = True,
) -> torch.Tensor:
    """The experts over a routed batch: (T, H) in x's dtype; without `sum_top_k`, each
    token's top_k weighted expert outputs unsummed, (T, top_k, H)."""
    check_expert_weights(x, gate_up, down, scales)
    gate_up_scale, down_scale = scales or (gate_up, down)  # (unread without scales)
    assert routing.block_m == config.block_m, "routing sorted for another block size"
    tokens, top_k = routing.experts.shape
    assert tokens == x.shape[0] and routing.sorted_ids.device == x.device
    _, two_inner, hidden = gate_up.shape
    inner, blocks = two_inner // 2, routing.block_expert.shape[0]
    out = torch.empty((tokens * top_k, hidden), dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out.view(tokens, hidden)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    h = torch.empty((blocks * config.block_m, inner), dtype=x.dtype, device=x.device)
    tile = fit_shared_memory(config.gate_up, config.block_m, 2, x.element_size())
    _gate_up_kernel[(blocks * triton.cdiv(inner, tile.block_n),)](
        x, gate_up, gate_up_scale, h, routing.sorted_ids, routing.block_expert,
        routing.block_rows, blocks, inner, hidden, x.stride(0), gate_up.stride(0),
        gate_up.stride(1), gate_up_scale.stride(0), h.stride(0),
        TOP_K=top_k, BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=config.group_m, EVEN_K=hidden % tile.block_k == 0, PRECISION=precision,
        W_SCALED=scales is not None, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    tile = fit_shared_memory(config.down, config.block_m, 1, x.element_size())
    _down_kernel[(blocks * triton.cdiv(hidden, tile.block_n),)](
        h, down, down_scale, out, routing.sorted_ids, routing.weights, routing.block_expert,
        routing.block_rows, blocks, hidden, inner, h.stride(0), down.stride(0),
        down.stride(1), down_scale.stride(0), out.stride(0),
        BLOCK_M=config.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        GROUP_M=config.group_m, EVEN_K=inner % tile.block_k == 0, PRECISION=precision,
        W_SCALED=scales is not None, num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    if not sum_top_k:
        return out.view(tokens, top_k, hidden)
    if top_k == 1:
        return out
    return out.view(tokens, top_k, hidden).sum(dim=1)


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    config: MoeConfig | None = None,
    scales: ExpertScales | None = None,
    sum_top_k: bool = True,
) -> torch.Tensor:
    """Triton version of `fused_moe_ref.fused_moe_ref(x, gate_up, down,
    route_ref(router_logits, top_k, renormalize), scales)`: x (T, H), router_logits (T, E)."""
    assert router_logits.shape == (x.shape[0], gate_up.shape[0]), "router_logits: (T, E)"
    config = config or moe_config(x.shape[0], top_k, gate_up.shape[0])
    routing = route(router_logits, top_k, renormalize, config.block_m)
    if expert_gemv_on(x):
        from mii.kernels.moe_gemv import expert_gemv

        out = expert_gemv(x, gate_up, down, routing.experts, routing.weights, scales)
        return out if not sum_top_k else out.sum(dim=1)
    return expert_gemms(x, gate_up, down, routing, config, scales, sum_top_k)


EXPERT_GEMV_TOKENS = 1
"""Two H200s, Mixtral-8x7B TP=2, 2026-11-27: one token's layer in CUDA graphs
(`bench_moe.py --graphs`) 0.093 ms through the expert GEMVs against 0.094 through the
grouped GEMMs in bf16, 0.056 against 0.089 over float8 experts; batch 1 in the engine
(`bench_moe_engine.py --latency-only`) 4.55 ms/token against 4.64. At two and four tokens
the bf16 GEMVs lose (0.174 against 0.172, 0.268 against 0.261)."""


def expert_gemv_on(x: torch.Tensor) -> bool:
    """Whether a step of x's tokens goes through kernels/moe_gemv.py instead of the grouped
    GEMMs: at most EXPERT_GEMV_TOKENS tokens (batch-1 decode), `MII_MOE_GEMV` not 0."""
    return x.shape[0] <= EXPERT_GEMV_TOKENS and os.environ.get("MII_MOE_GEMV", "1") != "0"
