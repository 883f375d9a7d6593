"""Decode-size mixture-of-experts: the routed experts of 1 to 4 tokens as GEMVs.

At one token a Mixtral layer reads two experts' weights (gate_up (2I, H) and down (H, I)
each) and does nothing else worth the name, so it is bound by reading them once. The
grouped GEMMs of kernels/fused_moe.py pad each expert's one row to a 16-row tensor-core
block; this module streams the weights as kernels/gemv.py does (read it first): each
program walks a (BLOCK_N, BLOCK_K) weight tile along K with 16-byte loads, converts it to
float32 in registers, multiplies it by x's K slice loaded in the tile's own layout (a
stride-0 row dimension, L1 hits, no exchange through shared memory) and sums along K.

Contract (`expert_gemv_ref`, the rounding steps of `fused_moe._gate_up_kernel` and
`_down_kernel` exactly; only the float32 summation order differs from their tl.dot):

- x (T, H) bf16/fp16/fp32 with dense rows; gate_up (E, 2I, H) with each expert's gate rows
  [0, I) then its up rows [I, 2I); down (E, H, I); both with a dense last dim, in x's dtype,
  or float8_e4m3fn with `scales` = (gate_up_scale (E, 2I), down_scale (E, H)) float32 (one
  scale per expert and output row, as `fused_moe.expert_gemms` takes them).
- experts (T, K) int32/int64 and weights (T, K) float32: `fused_moe.route`'s
  `SortedRouting.experts` / `.weights` (its sort is not used here), or `route_ref`'s.
- For each (token, slot) row r = t * K + j with e = experts[t, j], all sums in float32:
  g = round(sum_h gate_e[i, h] * x[t, h] * gs_e[i]), u likewise with the up rows,
  a = round(g / (1 + exp(-g))), h[r] = round(a * u) (x's dtype), then
  out[t, j] = round(round(sum_i down_e[n, i] * h[r, i] * ds_e[n]) * weights[t, j]),
  returned as (T, K, H) in x's dtype: the rows `expert_gemms(..., sum_top_k=False)`
  returns. Summing over K (in float32, as `out.sum(1)` does) is the caller's.

Two launches, one "row" per (token, slot) pair (R = T * K rows). Two rows on the same expert
read it twice; the programs of one column tile of every row sit side by side in the grid
so that the second read should come from L2 (not measured).

1. `_gate_up_kernel`, grid (R * cdiv(I, BLOCK_N), SPLIT_K): BLOCK_N gate rows and the
   matching BLOCK_N up rows of expert experts[r] per step, two float32 accumulators over
   one K loop (x's slice loaded once for both); the epilogue applies the scales, rounds and
   takes SiLU-and-mul into h (R, I) in x's dtype.
2. `_down_kernel`, grid (R * cdiv(H, BLOCK_N), SPLIT_K): h[r] times down[experts[r]] over
   I; the epilogue applies the scale, rounds, multiplies by weights[r] and stores out[r].

Splits meet as in gemv.py: float32 partials in a cached workspace (SPLIT_K, R, width), one
acq_rel arrival counter per (row, column tile); the last split to arrive adds the partials
in split order (the same bits whichever program is last), runs the epilogue and puts the
counter back to 0 for the next call (CUDA graph replays included). The workspaces are per
(device, SPLIT_K, R, width, tiles), allocated zeroed on first use and kept; calls that share
one must run in stream order. Allocate them before a CUDA graph capture
(`reserve_workspaces`, or one eager call).

These two launch without programmatic dependent launch (kernels/pdl.py), though the kernels
around them use it: launched with it as well (each waiting for the kernel before at its
start), Mixtral-8x7B TP=2 at batch 1 hung in the engine (`bench_moe_engine.py
--latency-only`, two H100s, twice past 200 s); with these two launched plainly it ran
(5.83 ms/token). The cause is not known; this module's GPU tests, eager, passed with it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.fused_moe_ref import ExpertScales, check_expert_weights
from mii.kernels.gemv import (
    DEFAULT_SMS,
    THREAD_ELEMENTS,
    TILE_ROW_BYTES,
    GemvTile,
    _sm_count,
    split_k,
    warps_for,
    weight_tile,
    x_slice,
)
from mii.kernels.split_k import arrive_last, cached_workspace, split_tiles, split_total

MAX_TOKENS = 4  # the sizes the tiles were chosen for; larger T runs, slower than the GEMMs
GATE_UP_ROWS = 16  # BLOCK_N of gate_up: 16 gate + 16 up rows a step, as gemv's 32 rows
DOWN_ROWS = 32  # BLOCK_N of down


class ExpertGemvTiles(NamedTuple):
    gate_up: GemvTile
    down: GemvTile


def expert_gemv_supported(x: torch.Tensor, gate_up: torch.Tensor, experts: torch.Tensor) -> bool:
    """Whether the token count is one this kernel was tuned for (1 to MAX_TOKENS)."""
    return x.dim() == 2 and 1 <= x.shape[0] <= MAX_TOKENS and experts.shape[0] == x.shape[0]


def _tile(rows: int, n: int, k: int, itemsize: int, sms: int, tile_rows: int, tiles: int):
    block_k = min(TILE_ROW_BYTES // itemsize, triton.next_power_of_2(max(k, 16)))
    block_n = min(tile_rows, max(8, triton.next_power_of_2(n)))
    elements = tiles * block_n * block_k  # weight elements a program converts per step
    num_warps = warps_for(elements, THREAD_ELEMENTS)
    programs_n = rows * triton.cdiv(n, block_n)
    return GemvTile(block_n, block_k, split_k(programs_n, triton.cdiv(k, block_k), sms),
                    num_warps, 2)  # fmt: skip


def expert_gemv_tiles(
    rows: int, hidden: int, inner: int, itemsize: int = 2, sms: int = DEFAULT_SMS
) -> ExpertGemvTiles:
    """Tiles of TILE_ROW_BYTES along K (BLOCK_K 256 bf16, 512 fp8, 128 fp32); gate_up
    GATE_UP_ROWS gate and as many up rows a step, down DOWN_ROWS rows; warps so that a
    thread converts THREAD_ELEMENTS weights a step (4 for bf16, 8 for fp8's doubled K);
    SPLIT_K as gemv_tile's over all R rows' column tiles (about PROGRAMS_PER_SM programs
    per SM). Mixtral TP=2 (H 4096, I 7168) on 132 SMs, bf16: R=2 gate_up 16x256 split 1
    (896 programs), down 32x256 split 4 (1024); R=4 gate_up split 1, down split 2; fp8
    (8 warps): R=2 gate_up 16x512 split 1, down 32x512 split 3. ptxas -v for sm_90a, compiled
    offline with triton 3.9 (bf16 x, split 1 and 4): bf16 at 4 warps 56-59 registers, fp8
    at 8 warps 56-64 (72 at 4 warps), no spills."""
    return ExpertGemvTiles(
        _tile(rows, inner, hidden, itemsize, sms, GATE_UP_ROWS, 2),
        _tile(rows, hidden, inner, itemsize, sms, DOWN_ROWS, 1),
    )


def _round(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.to(dtype).float()


def expert_gemv_ref(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    scales: ExpertScales | None = None,
) -> torch.Tensor:
    """The contract (module docstring), one (token, slot) row at a time in float32 with the
    kernels' roundings: (T, K, H) in x's dtype."""
    tokens, top_k = experts.shape
    inner = gate_up.shape[1] // 2
    dtype = x.dtype
    out = torch.empty((tokens, top_k, x.shape[1]), dtype=dtype, device=x.device)
    for t in range(tokens):
        for j in range(top_k):
            e = int(experts[t, j])
            acc = gate_up[e].float() @ x[t].float()  # (2I,)
            if scales is not None:
                acc = acc * scales[0][e].float()
            gate, up = _round(acc[:inner], dtype), _round(acc[inner:], dtype)
            act = _round(gate / (1.0 + torch.exp(-gate)), dtype)
            h = _round(act * up, dtype)
            y = down[e].float() @ h  # (H,)
            if scales is not None:
                y = y * scales[1][e].float()
            out[t, j] = (_round(y, dtype) * weights[t, j].float()).to(dtype)
    return out


# ---- kernels ---------------------------------------------------------------------------


@triton.jit
def _gate_up_epilogue(
    acc_g, acc_u, rn, n_mask, expert, scale_ptr, stride_se, inner, h_row_ptr,
    W_SCALED: tl.constexpr,
):  # fmt: skip
    """Scales on the float32 sums, then rounded as fused_moe._gate_up_kernel rounds: the
    projections, silu(gate), the product."""
    if W_SCALED:
        s_ptrs = scale_ptr + expert * stride_se + rn
        acc_g = acc_g * tl.load(s_ptrs, mask=n_mask, other=0.0)
        acc_u = acc_u * tl.load(s_ptrs + inner, mask=n_mask, other=0.0)
    dtype = h_row_ptr.dtype.element_ty
    gate = acc_g.to(dtype).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    h = (act * acc_u.to(dtype).to(tl.float32)).to(dtype)
    tl.store(h_row_ptr + rn, h, mask=n_mask)


@triton.jit
def _gate_up_kernel(
    x_ptr, w_ptr, scale_ptr, experts_ptr, h_ptr, part_ptr, count_ptr,
    rows, inner, hidden, stride_xm, stride_we, stride_wn, stride_se, stride_hm,
    TOP_K: tl.constexpr, W_SCALED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)  # column tile pid // rows of row pid % rows
    pid_k = tl.program_id(1)
    row = pid % rows
    expert = tl.load(experts_ptr + row).to(tl.int64)
    x_row = x_ptr + (row // TOP_K).to(tl.int64) * stride_xm
    rn = (pid // rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < inner
    rk = tl.arange(0, BLOCK_K)
    # Rows past I read the first gate (up) row again (never stored): no row mask.
    g_rows = (w_ptr + expert * stride_we
              + tl.where(n_mask, rn, 0).to(tl.int64)[:, None] * stride_wn)  # fmt: skip
    u_rows = g_rows + inner * stride_wn  # the up rows follow the gate rows
    k_first, k_end = split_tiles(pid_k, hidden, BLOCK_K, SPLIT_K)
    acc_g = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in range(k_first, k_end):
        ks = kt * BLOCK_K + rk
        k_mask = ks < hidden
        g = weight_tile(g_rows, ks, k_mask, EVEN_K)
        u = weight_tile(u_rows, ks, k_mask, EVEN_K)
        xk = x_slice(x_row, g, ks, k_mask, EVEN_K)
        acc_g += tl.sum(g * xk, axis=1)
        acc_u += tl.sum(u * xk, axis=1)

    h_row = h_ptr + row * stride_hm
    if SPLIT_K == 1:
        _gate_up_epilogue(acc_g, acc_u, rn, n_mask, expert, scale_ptr, stride_se, inner,
                          h_row, W_SCALED)  # fmt: skip
    else:
        # partials (SPLIT_K, rows, 2 * inner): gate sums then up sums of each row
        stride_split = rows * 2 * inner
        part_row = part_ptr + row * 2 * inner
        tl.store(part_row + pid_k * stride_split + rn, acc_g, mask=n_mask)
        tl.store(part_row + pid_k * stride_split + inner + rn, acc_u, mask=n_mask)
        if arrive_last(count_ptr + pid, SPLIT_K):
            _gate_up_epilogue(
                split_total(part_row, rn, n_mask, stride_split, SPLIT_K),
                split_total(part_row + inner, rn, n_mask, stride_split, SPLIT_K),
                rn, n_mask, expert, scale_ptr, stride_se, inner, h_row, W_SCALED,
            )  # fmt: skip
            tl.atomic_xchg(count_ptr + pid, 0)  # clean for the next call


@triton.jit
def _down_epilogue(
    acc, rn, n_mask, expert, scale_ptr, stride_se, weight, out_row_ptr,
    W_SCALED: tl.constexpr,
):  # fmt: skip
    """As fused_moe._down_kernel: the projection rounded, then scaled by the routing weight
    in float32 and rounded again."""
    if W_SCALED:
        acc = acc * tl.load(scale_ptr + expert * stride_se + rn, mask=n_mask, other=0.0)
    dtype = out_row_ptr.dtype.element_ty
    y = acc.to(dtype).to(tl.float32) * weight
    tl.store(out_row_ptr + rn, y.to(dtype), mask=n_mask)


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, scale_ptr, experts_ptr, weights_ptr, out_ptr, part_ptr, count_ptr,
    rows, hidden, inner, stride_hm, stride_we, stride_wn, stride_se, stride_om,
    W_SCALED: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    row = pid % rows
    expert = tl.load(experts_ptr + row).to(tl.int64)
    h_row = h_ptr + row * stride_hm
    rn = (pid // rows) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < hidden
    rk = tl.arange(0, BLOCK_K)
    w_rows = (w_ptr + expert * stride_we
              + tl.where(n_mask, rn, 0).to(tl.int64)[:, None] * stride_wn)  # fmt: skip
    k_first, k_end = split_tiles(pid_k, inner, BLOCK_K, SPLIT_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for kt in range(k_first, k_end):
        ks = kt * BLOCK_K + rk
        k_mask = ks < inner
        w = weight_tile(w_rows, ks, k_mask, EVEN_K)
        acc += tl.sum(w * x_slice(h_row, w, ks, k_mask, EVEN_K), axis=1)

    weight = tl.load(weights_ptr + row)
    out_row = out_ptr + row * stride_om
    if SPLIT_K == 1:
        _down_epilogue(acc, rn, n_mask, expert, scale_ptr, stride_se, weight, out_row,
                       W_SCALED)  # fmt: skip
    else:
        stride_split = rows * hidden  # partials (SPLIT_K, rows, hidden)
        part_row = part_ptr + row * hidden
        tl.store(part_row + pid_k * stride_split + rn, acc, mask=n_mask)
        if arrive_last(count_ptr + pid, SPLIT_K):
            _down_epilogue(
                split_total(part_row, rn, n_mask, stride_split, SPLIT_K),
                rn, n_mask, expert, scale_ptr, stride_se, weight, out_row, W_SCALED,
            )  # fmt: skip
            tl.atomic_xchg(count_ptr + pid, 0)


# ---- host side -------------------------------------------------------------------------


def reserve_workspace(
    device: torch.device, split_k: int, rows: int, width: int, tiles: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partials (split_k, rows, width) and the int32 arrival counters (rows *
    tiles, one per program of a split) of one launch shape, allocated zeroed on first use
    and cached."""
    return cached_workspace(device, (split_k, rows, width), rows * tiles)


def _workspaces(device, rows: int, hidden: int, inner: int, tiles: ExpertGemvTiles):
    """(gate_up's, down's) workspaces; None where a launch does not split."""
    gu, dn = tiles
    return (
        reserve_workspace(device, gu.split_k, rows, 2 * inner, triton.cdiv(inner, gu.block_n))
        if gu.split_k > 1
        else None,
        reserve_workspace(device, dn.split_k, rows, hidden, triton.cdiv(hidden, dn.block_n))
        if dn.split_k > 1
        else None,
    )


def reserve_workspaces(
    x: torch.Tensor, gate_up: torch.Tensor, top_k: int, tiles: ExpertGemvTiles | None = None
) -> ExpertGemvTiles:
    """Allocate the workspaces of `expert_gemv(x, gate_up, ...)` at this x's token count
    and `top_k` (call before capturing a CUDA graph); returns the tiles."""
    rows, (_, two_inner, hidden) = x.shape[0] * top_k, gate_up.shape
    tiles = tiles or expert_gemv_tiles(
        rows, hidden, two_inner // 2, gate_up.element_size(), _sm_count(x.device)
    )
    _workspaces(x.device, rows, hidden, two_inner // 2, tiles)
    return tiles


def _check(x, gate_up, down, experts, weights, scales) -> None:
    check_expert_weights(x, gate_up, down, scales)
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    assert experts.dim() == 2 and experts.shape[0] == x.shape[0], "experts: (T, K)"
    assert experts.dtype in (torch.int32, torch.int64), experts.dtype
    assert weights.shape == experts.shape and weights.dtype == torch.float32, "weights: (T, K)"
    assert experts.device == weights.device == x.device


def expert_gemv(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    scales: ExpertScales | None = None,
    tiles: ExpertGemvTiles | None = None,
) -> torch.Tensor:
    """Each token's K routed experts, unsummed: (T, K, H) in x's dtype (`expert_gemv_ref`,
    the module docstring's contract). `tiles` overrides `expert_gemv_tiles` (tests,
    benchmarks)."""
    _check(x, gate_up, down, experts, weights, scales)
    tokens, top_k = experts.shape
    _, two_inner, hidden = gate_up.shape
    inner, rows = two_inner // 2, tokens * top_k
    out = torch.empty((tokens, top_k, hidden), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    tiles = tiles or expert_gemv_tiles(
        rows, hidden, inner, gate_up.element_size(), _sm_count(x.device)
    )
    gate_up_scale, down_scale = scales or (gate_up, down)  # (unread without scales)
    experts, weights = experts.contiguous(), weights.contiguous()
    h = torch.empty((rows, inner), dtype=x.dtype, device=x.device)
    gu_ws, dn_ws = _workspaces(x.device, rows, hidden, inner, tiles)
    gu_part, gu_count = gu_ws or (h, h)  # never read without a split
    dn_part, dn_count = dn_ws or (out, out)
    gu, dn = tiles
    _gate_up_kernel[(rows * triton.cdiv(inner, gu.block_n), gu.split_k)](
        x, gate_up, gate_up_scale, experts, h, gu_part, gu_count,
        rows, inner, hidden, x.stride(0), gate_up.stride(0), gate_up.stride(1),
        gate_up_scale.stride(0), h.stride(0),
        TOP_K=top_k, W_SCALED=scales is not None, EVEN_K=hidden % gu.block_k == 0,
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, SPLIT_K=gu.split_k,
        num_warps=gu.num_warps, num_stages=gu.num_stages,
    )  # fmt: skip
    _down_kernel[(rows * triton.cdiv(hidden, dn.block_n), dn.split_k)](
        h, down, down_scale, experts, weights, out, dn_part, dn_count,
        rows, hidden, inner, h.stride(0), down.stride(0), down.stride(1),
        down_scale.stride(0), hidden,
        W_SCALED=scales is not None, EVEN_K=inner % dn.block_k == 0,
        BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, SPLIT_K=dn.split_k,
        num_warps=dn.num_warps, num_stages=dn.num_stages,
    )  # fmt: skip
    return out
