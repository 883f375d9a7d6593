"""Decode-size GEMV: y = x @ W.T for x (M, K) of 1 to 4 rows, W (N, K) in x's dtype
(bf16/fp16/fp32) or float8 e4m3 with a float32 scale per output row, plus an optional bias.

At batch 1 a decode step's linear layers are bound by reading their weights once; cuBLAS's
M=1 kernels reach about half the copy bandwidth on the small projections of a 7B model. This
kernel spends nothing on tensor cores (M is 1-4): each program streams a (BLOCK_N, BLOCK_K)
tile of W per step with 16-byte loads coalesced along K, converts it to float32, multiplies
it by each row's K slice of x broadcast over the tile and sums along K into one float32
accumulator per output row (M is a compile-time constant, the rows unrolled). x is loaded
in the weight tile's own layout (a stride-0 row dimension: each thread reads the columns
it multiplies, L1 hits) rather than as a vector exchanged through shared memory, which
cost two barriers per row and step.

Narrow outputs have too few column tiles to fill the GPU, so the K range is split over a
second grid axis (`gemv_tile` picks SPLIT_K so that the grid holds several programs per SM).
The splits meet without a zero-fill or cast launch: each writes its float32 partial sums
into a cached workspace (SPLIT_K, M, N) and bumps its column tile's arrival counter (one
acq_rel atomic); the program that arrives last adds the SPLIT_K partials in split order
(the same order whichever program is last, so the result is bit-reproducible run to run),
applies the scale and bias, stores y in x's dtype and puts the counter back to 0 for the
next call (CUDA graph replays included). With SPLIT_K == 1 the program stores y itself.
That epilogue is a chain of round trips (the barrier and the atomic, the partials' reload,
the store) after the last weight tile, which the next kernel waits behind: on an H200 it
was 1-2.8 us of a 4.5-17.6 us one-row GEMV. `defer=True` leaves it to the kernel that
reads y (kernels/rms_norm.py, after the output and down projections): the GEMV returns
the `SplitSums`, and that kernel adds the partials up in the same order where it would
have loaded y (kernels/split_k.py `split_sums`), the same bits. The engine defers float8 GEMVs
only (kernels/dispatch.py says why).

A gated MLP's down projection (`gated`) takes x = [gate | up] (M, 2K) instead and forms
act(gate) * up where the x slice is loaded, with kernels/activation.py's `act_and_mul`
(the same rounding as its kernel, so the result is the bits of gemv(act_and_mul(x))): at one
row that saves the activation's launch, and x is read once from L1/L2 either way.

Launched with programmatic dependent launch (kernels/pdl.py, Hopper): each program loads
its first weight tile, which no kernel writes, then waits for the kernel before (the norm,
the attention, the all-reduce that produces x) and goes on; the weights stream while that
kernel finishes. The first tile's sums are added first, as without PDL: the same bits.

Rounding as `gemv_ref`: float32 sums, y = acc * scale + bias cast once to the output dtype.
The workspace and counters are per (device, SPLIT_K, M, N, BLOCK_N), allocated zeroed on
first use and kept; calls that share one must run in stream order (one stream per device,
as the engine's decode steps). Allocate them before a CUDA graph capture (`reserve_workspace`, or
one eager call): one first allocated inside a capture is zeroed only when the graph replays.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.activation import act_and_mul
from mii.kernels.all_reduce import MAX_RANKS, PeerBuffers, peer_table, push_row
from mii.kernels.pdl import pdl_args, release_next, wait_prior
from mii.kernels.split_k import (
    arrive_last,
    cached_workspace,
    epilogue,
    split_constants,
    split_tiles,
    split_total,
)
from mii.kernels.torch_ref import Pushed, SplitSums, gelu_tanh_and_mul_ref, silu_and_mul_ref

GATED_REFS = {"silu": silu_and_mul_ref, "gelu_tanh": gelu_tanh_and_mul_ref}
"""The gated activations `gemv` folds into its load of x, by name, with their references."""
MAX_M = 4
PUSH_SLOTS = tl.constexpr(MAX_RANKS)
DEFAULT_SMS = 132  # H100 SXM; the real count is read from the device on CUDA
PROGRAMS_PER_SM = 4  # target grid size, in programs per SM
TILE_ROW_BYTES = 512  # bytes of one weight row a tile spans (BLOCK_K * itemsize)
TILE_ROWS = 32  # BLOCK_N
THREAD_ELEMENTS = 64  # weight elements per thread per step (float32 registers once converted)


class GemvTile(NamedTuple):
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 2


def gemv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `gemv` takes these operands (M of 1 to MAX_M, dense last dims, dtypes)."""
    return (
        x.dim() == 2
        and 1 <= x.shape[0] <= MAX_M
        and x.stride(1) == 1
        and weight.dim() == 2
        and weight.stride(1) == 1
        and weight.shape[1] == x.shape[1]
        and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
        and weight.dtype in (x.dtype, torch.float8_e4m3fn)
    )


def gemv_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    gated: str | None = None,
) -> torch.Tensor:
    """The contract: y[m, n] = scale[n] * sum_k x[m, k] * float(W[n, k]) + bias[n], the sum
    and the epilogue in float32, cast once to x's dtype. `gated`: x is (M, 2K) = [gate | up]
    and takes the place of x above as act(gate) * up in x's dtype (`GATED_REFS`)."""
    if gated is not None:
        x = GATED_REFS[gated](x)
    acc = x.float() @ weight.float().t()
    if w_scale is not None:
        acc = acc * w_scale.float()[None, :]
    if bias is not None:
        acc = acc + bias.float()[None, :]
    return acc.to(x.dtype)


_SMS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SMS:
        _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SMS[index]


def warps_for(elements: int, per_thread: int = THREAD_ELEMENTS) -> int:
    """4 to 8 warps, so that a thread holds `per_thread` of the `elements` weights a program
    converts per step."""
    return max(4, min(8, elements // (32 * per_thread)))


def tile_warps(m: int, block_n: int, block_k: int) -> int:
    """`warps_for` the weight tile: THREAD_ELEMENTS a thread, half at M >= 3."""
    return warps_for(block_n * block_k, THREAD_ELEMENTS if m <= 2 else THREAD_ELEMENTS // 2)


def split_k(programs_n: int, k_tiles: int, sms: int) -> int:
    """The smallest divisor of the K tiles from the split that gives PROGRAMS_PER_SM
    programs per SM (over `programs_n` column tiles) to twice it, else the first split from
    there whose last part starts inside K (k_tiles always does)."""
    want = min(triton.cdiv(PROGRAMS_PER_SM * sms, programs_n), k_tiles)
    even = (s for s in range(want, min(2 * want, k_tiles) + 1) if k_tiles % s == 0)
    filled = (s for s in range(want, k_tiles + 1) if (s - 1) * triton.cdiv(k_tiles, s) < k_tiles)
    return next(even, None) or next(filled)


MEASURED_TILES: dict[tuple[int, int, int], GemvTile] = {
    # (N, K, weight bytes per element): tile, us (the rule's tile, us)
    (6144, 4096, 2): GemvTile(64, 256, 4, 8),  # qkv 17.98 (18.85)
    (4096, 4096, 2): GemvTile(64, 256, 4, 8),  # o 12.98 (14.58)
    (4096, 2048, 2): GemvTile(64, 256, 4, 8),  # TP=2 o 7.74 (8.42)
    (6144, 4096, 1): GemvTile(64, 512, 4, 8),  # qkv 9.84 (11.47)
    (4096, 4096, 1): GemvTile(32, 512, 4, 8),  # o 7.41 (8.65)
    (3072, 4096, 1): GemvTile(32, 512, 4, 8),  # TP=2 qkv 6.34 (7.19)
    (4096, 2048, 1): GemvTile(64, 512, 4, 8),  # TP=2 o 4.88 (5.28)
    (14336, 4096, 1): GemvTile(32, 512, 1, 8),  # TP=2 gate_up 21.06 (22.27)
}
"""One-row tiles that beat `gemv_tile`'s rule by 4% or more at the Mistral-7B / Llama-3-8B
projections (and a TP=2 rank's), from `scripts/bench_gemv.py --sweep --rows 1` on an H100
SXM (132 SMs), 2026-11-27: fewer, larger programs for the narrow outputs (2-4 per SM, not
4-8). Taken on GPUs of MEASURED_SMS SMs only; the other shapes keep the rule."""
MEASURED_SMS = 132


def gemv_tile(m: int, n: int, k: int, w_itemsize: int = 2, sms: int = DEFAULT_SMS) -> GemvTile:
    """A weight tile of TILE_ROWS rows by TILE_ROW_BYTES (BLOCK_K = 256 bf16, 512 fp8, 128
    fp32): one warp's 32 16-byte loads span a row's K slice, so the reduction along K stays
    inside a warp and the warps split the rows; 16 KB of weights in flight per program step.
    Warps by `tile_warps`: 4 for bf16 at M <= 2, 8 otherwise (ptxas for sm_90a, compiled
    offline: 48-128 registers, no spills; at 4 warps M=4 takes 168 bf16, 187 fp8). Then
    SPLIT_K: the smallest divisor of the K tiles from the split that gives PROGRAMS_PER_SM
    programs per SM to twice it, else the next split up with none empty (none starting past
    K). bf16 at M=1 on 132 SMs: qkv N=6144 K=4096 splits 4, o 4096x4096 8, gate_up
    28672x4096 1, down 4096x14336 7; the TP=2 halves 8, 8, 2, 7. One row on MEASURED_SMS
    SMs at a shape of MEASURED_TILES: that tile instead."""
    if m == 1 and sms == MEASURED_SMS and (n, k, w_itemsize) in MEASURED_TILES:
        return MEASURED_TILES[n, k, w_itemsize]
    block_k = min(TILE_ROW_BYTES // w_itemsize, triton.next_power_of_2(max(k, 16)))
    block_n = min(TILE_ROWS, max(8, triton.next_power_of_2(n)))
    splits = split_k(triton.cdiv(n, block_n), triton.cdiv(k, block_k), sms)
    return GemvTile(block_n, block_k, splits, tile_warps(m, block_n, block_k), 2)


@triton.jit
def _x_values(x_row_ptr, w, ks, k_mask, EVEN_K: tl.constexpr):
    """x's K slice in the weight tile w's layout (every row the same, stride 0), in x's
    dtype: each thread reads the columns it multiplies (L1 hits), no exchange through
    shared memory."""
    x_ptrs = x_row_ptr + tl.zeros(w.shape, tl.int32) + ks[None, :]
    if EVEN_K:
        xk = tl.load(x_ptrs, eviction_policy="evict_last")
    else:
        xk = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_last")
    return xk


@triton.jit
def x_slice(x_row_ptr, w, ks, k_mask, EVEN_K: tl.constexpr):
    """x's K slice in the weight tile w's layout, float32 (`_x_values`)."""
    return _x_values(x_row_ptr, w, ks, k_mask, EVEN_K).to(tl.float32)


@triton.jit
def gated_x_slice(x_row_ptr, K, w, ks, k_mask, EVEN_K: tl.constexpr, GELU: tl.constexpr):
    """The K slice of act(gate) * up for a row [gate | up] of 2K, in w's layout, float32:
    the gate and up slices loaded as `x_slice` loads x, rounded as `act_and_mul` rounds
    (the masked columns load 0, whose product is 0)."""
    gate = _x_values(x_row_ptr, w, ks, k_mask, EVEN_K)
    up = _x_values(x_row_ptr + K, w, ks, k_mask, EVEN_K)
    return act_and_mul(gate, up, GELU).to(tl.float32)


@triton.jit
def _row_sum(
    x_row_ptr, K, w, ks, k_mask, EVEN_K: tl.constexpr, GATED: tl.constexpr, GELU: tl.constexpr
):  # fmt: skip
    """sum_k W[n, k] * x[k] over one tile: (BLOCK_N,) float32; x[k] = act(gate) * up when
    GATED."""
    if GATED:
        xk = gated_x_slice(x_row_ptr, K, w, ks, k_mask, EVEN_K, GELU)
    else:
        xk = x_slice(x_row_ptr, w, ks, k_mask, EVEN_K)
    return tl.sum(w * xk, axis=1)


@triton.jit
def _tile_sums(
    acc0, acc1, acc2, acc3, x_ptr, stride_xm, K, w, ks, k_mask,
    EVEN_K: tl.constexpr, M: tl.constexpr, GATED: tl.constexpr, GELU: tl.constexpr,
):  # fmt: skip
    """The first M rows' sums over one weight tile added to their accumulators."""
    acc0 += _row_sum(x_ptr, K, w, ks, k_mask, EVEN_K, GATED, GELU)
    if M > 1:
        acc1 += _row_sum(x_ptr + stride_xm, K, w, ks, k_mask, EVEN_K, GATED, GELU)
    if M > 2:
        acc2 += _row_sum(x_ptr + 2 * stride_xm, K, w, ks, k_mask, EVEN_K, GATED, GELU)
    if M > 3:
        acc3 += _row_sum(x_ptr + 3 * stride_xm, K, w, ks, k_mask, EVEN_K, GATED, GELU)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_row(
    acc, row, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr, slot, rank,
    W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, PUSH_WORLD: tl.constexpr,
):  # fmt: skip
    """y = acc * scale + bias in float32, cast once to the output dtype; with PUSH_WORLD,
    also sent to the group's push buffers (kernels/all_reduce.py `push_row`; `peers`, the
    rows' epochs, a slot's elements and the rank: `_gemv_kernel`'s push arguments)."""
    y = epilogue(acc, scale, bias, W_SCALED, HAS_BIAS).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_om + rn, y, mask=n_mask)
    if PUSH_WORLD > 0:
        push_row(y, row, rn, n_mask, N, peers, epoch_ptr, slot, rank, PUSH_WORLD, PUSH_SLOTS)


@triton.jit
def _store_rows(
    acc0, acc1, acc2, acc3, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr,
    slot, rank, M: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
    PUSH_WORLD: tl.constexpr,
):  # fmt: skip
    """The first M rows' epilogues."""
    _store_row(acc0, 0, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr, slot,
               rank, W_SCALED, HAS_BIAS, PUSH_WORLD)  # fmt: skip
    if M > 1:
        _store_row(acc1, 1, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr,
                   slot, rank, W_SCALED, HAS_BIAS, PUSH_WORLD)  # fmt: skip
    if M > 2:
        _store_row(acc2, 2, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr,
                   slot, rank, W_SCALED, HAS_BIAS, PUSH_WORLD)  # fmt: skip
    if M > 3:
        _store_row(acc3, 3, rn, n_mask, scale, bias, out_ptr, stride_om, N, peers, epoch_ptr,
                   slot, rank, W_SCALED, HAS_BIAS, PUSH_WORLD)  # fmt: skip


@triton.jit
def _store_partials(part, acc0, acc1, acc2, acc3, n_mask, N, M: tl.constexpr):
    """One split's float32 sums of its first M rows: part = workspace[split, 0, tile]."""
    tl.store(part, acc0, mask=n_mask)
    if M > 1:
        tl.store(part + N, acc1, mask=n_mask)
    if M > 2:
        tl.store(part + 2 * N, acc2, mask=n_mask)
    if M > 3:
        tl.store(part + 3 * N, acc3, mask=n_mask)


@triton.jit
def weight_tile(rows_ptr, ks, k_mask, EVEN_K: tl.constexpr):
    """A (rows, BLOCK_K) tile of weight rows at `ks`, float8 (or 16-bit) converted to
    float32 in registers; read once, so evicted first."""
    if EVEN_K:
        w = tl.load(rows_ptr + ks[None, :], eviction_policy="evict_first")
    else:
        w = tl.load(rows_ptr + ks[None, :], mask=k_mask[None, :], other=0.0,
                    eviction_policy="evict_first")  # fmt: skip
    return w.to(tl.float32)


@triton.jit
def _row_total(
    part_ptr, ROW: tl.constexpr, rn, n_mask, N, M: tl.constexpr, SPLIT_K: tl.constexpr
):  # fmt: skip
    """Row ROW's `split_total` in the (SPLIT_K, M, N) partials; zeros for a row past M
    (never stored)."""
    total = tl.zeros(rn.shape, dtype=tl.float32)
    if ROW < M:
        total = split_total(part_ptr + ROW * N, rn, n_mask, M * N, SPLIT_K)
    return total


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, part_ptr, count_ptr,
    N, K, stride_xm, stride_wn, stride_om, push_data_ptr, push_epoch_ptr, push_slot, push_rank,
    M: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATED: tl.constexpr, GELU: tl.constexpr, DEFER: tl.constexpr, PUSH_WORLD: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """DEFER (with SPLIT_K > 1): store the partial sums and end; the kernel that reads y
    adds them up (`SplitSums`). PUSH_WORLD > 0: y is this rank's part of a sum over a group
    of PUSH_WORLD ranks, also sent into their push buffers (kernels/all_reduce.py
    `push_row`) as each column tile is stored."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    # Rows past N read row 0 again (never stored): the weight loads need no row mask.
    w_rows = w_ptr + tl.where(n_mask, rn, 0).to(tl.int64)[:, None] * stride_wn
    k_first, k_end = split_tiles(pid_k, K, BLOCK_K, SPLIT_K)
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    release_next(PDL)
    # The epilogue's constants load first (before the wait, as the first weight tile): at
    # the loop's end their loads would start only then, a round trip to memory more. A
    # deferred GEMV loads none: its reader applies them.
    scale, bias = split_constants(
        scale_ptr, bias_ptr, rn, n_mask, W_SCALED and not DEFER, HAS_BIAS and not DEFER
    )  # fmt: skip
    peers = peer_table(push_data_ptr, PUSH_WORLD, PUSH_SLOTS)  # constant, as the weights
    if PDL:  # the first weight tile loads while the kernel before finishes (kernels/pdl.py)
        # an empty last split (past K) loads the last tile and leaves it unused
        ks = tl.minimum(k_first, tl.cdiv(K, BLOCK_K) - 1) * BLOCK_K + rk
        k_mask = ks < K
        w = weight_tile(w_rows, ks, k_mask, EVEN_K)
        wait_prior(PDL)
        if k_first < k_end:
            acc0, acc1, acc2, acc3 = _tile_sums(
                acc0, acc1, acc2, acc3, x_ptr, stride_xm, K, w, ks, k_mask, EVEN_K, M, GATED,
                GELU,
            )  # fmt: skip
        k_first += 1
    for kt in range(k_first, k_end):
        ks = kt * BLOCK_K + rk
        k_mask = ks < K
        w = weight_tile(w_rows, ks, k_mask, EVEN_K)
        acc0, acc1, acc2, acc3 = _tile_sums(
            acc0, acc1, acc2, acc3, x_ptr, stride_xm, K, w, ks, k_mask, EVEN_K, M, GATED, GELU
        )  # fmt: skip

    if SPLIT_K == 1:
        _store_rows(acc0, acc1, acc2, acc3, rn, n_mask, scale, bias, out_ptr, stride_om, N,
                    peers, push_epoch_ptr, push_slot, push_rank, M, W_SCALED, HAS_BIAS,
                    PUSH_WORLD)  # fmt: skip
    else:
        _store_partials(part_ptr + pid_k * M * N + rn, acc0, acc1, acc2, acc3, n_mask, N, M)
        if not DEFER and arrive_last(count_ptr + pid_n, SPLIT_K):  # the column tile's epilogue
            acc0 = _row_total(part_ptr, 0, rn, n_mask, N, M, SPLIT_K)
            acc1 = _row_total(part_ptr, 1, rn, n_mask, N, M, SPLIT_K)
            acc2 = _row_total(part_ptr, 2, rn, n_mask, N, M, SPLIT_K)
            acc3 = _row_total(part_ptr, 3, rn, n_mask, N, M, SPLIT_K)
            _store_rows(acc0, acc1, acc2, acc3, rn, n_mask, scale, bias, out_ptr, stride_om, N,
                        peers, push_epoch_ptr, push_slot, push_rank, M, W_SCALED, HAS_BIAS,
                        PUSH_WORLD)  # fmt: skip
            tl.atomic_xchg(count_ptr + pid_n, 0)  # clean for the next call


def reserve_workspace(
    device: torch.device, split_k: int, m: int, n: int, block_n: int, deferred: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 partials (split_k, m, n) and the int32 arrival counters (one per column
    tile) of one call shape, allocated zeroed on first use and cached: call it (or `gemv`)
    before capturing a CUDA graph. `deferred` calls have partials of their own (a
    `SplitSums` waiting for its reader keeps them) and no counters."""
    return cached_workspace(device, (split_k, m, n), 0 if deferred else triton.cdiv(n, block_n))


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tile: GemvTile | None = None,
    gated: str | None = None,
    defer: bool = False,
    push: PeerBuffers | None = None,
) -> torch.Tensor | SplitSums | Pushed:
    """x (M, K) @ weight (N, K).T (* w_scale) (+ bias) -> (M, N) in x's dtype (`gemv_ref`).
    M of 1 to MAX_M; x and weight with dense rows; weight in x's dtype, or float8_e4m3fn with
    w_scale (N,) float32; bias (N,). `tile` overrides `gemv_tile` (benchmarks, tests).
    `gated` ("silu" or "gelu_tanh", a key of GATED_REFS): x is (M, 2K) = [gate | up] and the
    product is with act(gate) * up, rounded as kernels/activation.py rounds it, computed as
    x is loaded (a gated MLP's down projection without the activation's launch). `defer`:
    where the tile splits K, return the `SplitSums` for the kernel after to add up. `push`:
    y is this rank's part of a sum over the group of these push buffers; each tile of it is
    sent to the peers as it is stored, and y comes as `Pushed` for the norm after to finish
    (`one_shot_all_reduce_norm(..., pushed=True)`); not with `defer`. A y the buffers
    cannot take comes plain."""
    assert gated is None or gated in GATED_REFS, f"gated activation {gated!r}"
    assert x.dim() == 2 and x.stride(1) == 1, "x must be (M, K) with dense rows"
    m, n, k = x.shape[0], weight.shape[0], weight.shape[-1]
    assert 1 <= m <= MAX_M, f"gemv takes 1 to {MAX_M} rows, not {m}"
    assert x.shape[1] == (k if gated is None else 2 * k), (
        f"x {tuple(x.shape)} must be (M, {'2K' if gated else 'K'}) for weight (N, K = {k})"
    )
    assert weight.dim() == 2 and weight.stride(1) == 1, (
        f"weight {tuple(weight.shape)} must be (N, {k}) with dense rows"
    )
    assert x.dtype in (torch.bfloat16, torch.float16, torch.float32), x.dtype
    fp8 = weight.dtype == torch.float8_e4m3fn
    assert fp8 or weight.dtype == x.dtype, f"weight {weight.dtype} is not x's {x.dtype}"
    assert fp8 == (w_scale is not None), "float8 weights come with w_scale, only they"
    if fp8:
        assert w_scale.shape == (n,) and w_scale.dtype == torch.float32
        assert w_scale.is_contiguous()
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous() and bias.is_floating_point()
    assert x.device == weight.device, "x and weight on different devices"
    tile = tile or gemv_tile(m, n, k, weight.element_size(), _sm_count(x.device))
    defer = defer and tile.split_k > 1
    if push is not None:
        assert push.push and not defer, "a GEMV pushes y, to push buffers"
        # y those buffers cannot take (a small MII_PEER_ALL_REDUCE_MAX_BYTES, another dtype)
        # comes plain, and the norm after all-reduces it as it would without the push
        push = push if push.takes_rows(m, n, x.dtype) else None
        if push is not None:
            push.row_width = n
    out = torch.empty((0 if defer else m, n), dtype=x.dtype, device=x.device)
    if tile.split_k > 1:
        partials, counters = reserve_workspace(
            x.device, tile.split_k, m, n, tile.block_n, defer
        )  # fmt: skip
    else:
        partials, counters = out, out  # never read
    grid = (triton.cdiv(n, tile.block_n), tile.split_k)
    _gemv_kernel[grid](
        x, weight, weight if w_scale is None else w_scale, weight if bias is None else bias,
        out, partials, counters, n, k, x.stride(0), weight.stride(0), out.stride(0),
        *_push_args(push, out), M=m, W_SCALED=fp8, HAS_BIAS=bias is not None,
        EVEN_K=k % tile.block_k == 0, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        SPLIT_K=tile.split_k, GATED=gated is not None, GELU=gated == "gelu_tanh", DEFER=defer,
        PUSH_WORLD=0 if push is None else push.world, num_warps=tile.num_warps,
        num_stages=tile.num_stages, **pdl_args(x),
    )  # fmt: skip
    if push is not None:
        return Pushed(out, push)
    return SplitSums(partials, w_scale, bias, x.dtype) if defer else out


def _push_args(push: PeerBuffers | None, out: torch.Tensor) -> tuple:
    """The kernel's push arguments: the group's data addresses, the rows' epochs, a slot's
    elements, the rank (placeholders, never read, without `push`)."""
    if push is None:
        return out, out, 0, 0
    return push.peer_data, push.epochs, push.data.shape[-1], push.rank
