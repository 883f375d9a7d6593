"""Split-K's meeting of partial sums, shared by the decode GEMVs (kernels/gemv.py,
kernels/moe_gemv.py) and the kernels that read a deferred GEMV's sums (kernels/rms_norm.py).

A split program sums its K tiles (`split_tiles`) and stores float32 partials into a cached
workspace (`cached_workspace`). Either the last program to arrive at its column tile
(`arrive_last`) adds the splits in order (`split_total`) and stores y through `epilogue`, or
the GEMV defers that and the kernel after it reads `split_sums` where it would read y
(kernels/torch_ref.py `SplitSums`); both give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def split_tiles(pid_k, K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """The K tiles [first, end) that split pid_k of SPLIT_K sums (the last may be short or,
    past K, empty)."""
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = pid_k * per_split
    return first, tl.minimum(first + per_split, k_tiles)


@triton.jit
def split_total(part_ptr, rn, n_mask, stride_split, SPLIT_K: tl.constexpr):
    """One output row's SPLIT_K partial sums added in split order (bit-reproducible)."""
    total = tl.zeros(rn.shape, dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        # .cg: from L2, where the other programs' stores are (not a stale L1 line)
        total += tl.load(part_ptr + s * stride_split + rn, mask=n_mask, cache_modifier=".cg")
    return total


@triton.jit
def arrive_last(count_ptr, SPLIT_K: tl.constexpr):
    """After this program's partial stores: whether it is its tile's last split (then it
    writes the output and puts the counter back to 0)."""
    tl.debug_barrier()  # every thread's stores before the program's one release
    return tl.atomic_add(count_ptr, 1, sem="acq_rel") == SPLIT_K - 1


@triton.jit
def epilogue(acc, scale, bias, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr):
    """acc * scale + bias in float32 (the caller casts it once to the output dtype)."""
    if W_SCALED:
        acc = acc * scale
    if HAS_BIAS:
        acc = acc + bias
    return acc


@triton.jit
def split_constants(
    scale_ptr, bias_ptr, offs, mask, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr
):  # fmt: skip
    """The scale and bias of columns `offs` of a GEMV's y, or of its `SplitSums` (float32, 0
    past `mask`, 0 where not W_SCALED / HAS_BIAS): no kernel writes them, so the GEMV or the
    reader loads them before its PDL wait."""
    scale = tl.zeros(offs.shape, dtype=tl.float32)
    bias = tl.zeros(offs.shape, dtype=tl.float32)
    if W_SCALED:
        scale = tl.load(scale_ptr + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return scale, bias


@triton.jit
def split_sums(
    part_ptr, scale, bias, row, offs, mask, M, N,
    SPLIT_K: tl.constexpr, W_SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """Columns `offs` of row `row` of a `SplitSums` (scale and bias from `split_constants`),
    in float32 before the cast to its dtype: what the GEMV's epilogue would have stored,
    the same bits. A kernel that reads y reads these in its place."""
    total = split_total(part_ptr + row * N, offs, mask, M * N, SPLIT_K)
    return epilogue(total, scale, bias, W_SCALED, HAS_BIAS)


_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def cached_workspace(
    device: torch.device, partials_shape: tuple[int, ...], counters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed float32 partials of `partials_shape` and `counters` int32 arrival counters on
    `device`, allocated on first use and kept for every later call of the same shape (the
    counters are back at 0 after each call)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    key = (device, partials_shape, counters)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (
            torch.zeros(partials_shape, dtype=torch.float32, device=device),
            torch.zeros(counters, dtype=torch.int32, device=device),
        )
    return _WORKSPACES[key]
