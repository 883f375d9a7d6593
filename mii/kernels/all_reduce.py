"""One-shot sum all-reduce over buffers that every rank of a group has mapped (CUDA IPC).

Each rank owns a `PeerBuffers` region: float `data` (two halves, used by alternate calls)
and int64 `flags`, one row per program and one slot per source rank. A call's program `b`
copies chunk `b` of its input into its own half, stores the call's epoch into slot `rank`
of row `b` of every peer's flags (release, system scope), waits until every peer's slot in
its own row holds the epoch (acquire), then sums chunk `b` of every rank's half in rank
order, so every rank gets the same bits. One launch, no host work: it replays in CUDA
graphs, where the epoch lives in device memory and counts up per program.

Why two halves are enough: a rank that starts call e + 2 (which overwrites call e's half)
has passed call e + 1's wait, so every peer has started call e + 1, and a stream starts a
kernel only after the one before it (call e, whose reads of that half) has finished.

Push buffers (`PeerBuffers.push`, data (3, world, capacity)) take the other way round: a
call's program stores its chunk straight into slot `rank` of every peer's data, in the
third of the call's epoch modulo 3, and then reads its own third, slot by slot, until no
element is the empty mark (-0.0; a -0.0 in x is sent as +0.0, the same in a sum), and
sums in rank order. No flags, no fence, no read of a peer's memory: the data is its own
signal (what other servers call a Lamport all-reduce). Once read, a third is marked empty
again in the call after (every peer's stores into it have landed, and none writes it
again before this rank's next-but-one call reaches them).

Only peer loads and stores are used: no NVLink multicast (`multimem`), which stays off on
these machines.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.kernels.pdl import pdl_args, release_next, wait_prior
from mii.kernels.rms_norm import add_rounded, normalized
from mii.kernels.torch_ref import Pushed  # noqa: F401 - what `gemv(..., push=)` returns

MAX_RANKS = 8
ABORT_POLL = tl.constexpr(1024)
"""Spins on a peer's flag between two reads of the host's abort word."""
BLOCK = 2048
"""Elements per program: 4 KB of bf16 per rank, so an 8 KB decode message gets 2
programs and 512 KB gets 128, about one per SM."""


@triton.jit
def _addresses(peer_data_ptr, peer_flags_ptr, abort_at_ptr, WORLD: tl.constexpr,
               SLOTS: tl.constexpr):  # fmt: skip
    """The group's address tables, (SLOTS,) int64 each, and the host's abort word's address.
    They never change once the group is set up, so a kernel loads them before its PDL wait:
    loaded where they are used, each sat behind a store (the compiler keeps a load after a
    store that may alias), one round trip to memory after another in a few-microsecond call."""
    slots = tl.arange(0, SLOTS)
    flags = tl.load(peer_flags_ptr + slots, mask=slots < WORLD, other=0)
    return peer_table(peer_data_ptr, WORLD, SLOTS), flags, tl.load(abort_at_ptr)


@triton.jit
def _pick(addresses, peer, SLOTS: tl.constexpr):
    """Entry `peer` of a (SLOTS,) address table (in registers)."""
    return tl.sum(tl.where(tl.arange(0, SLOTS) == peer, addresses, 0), 0)


@triton.jit
def _signal_and_wait(
    flags_ptr, peer_flags, abort_at, epoch, rank, WORLD: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """This program's barrier across the group for the call numbered `epoch`; it gives up
    waiting once the host raises the abort word (a peer died: its signal never comes).
    `peer_flags`, `abort_at`: from `_addresses`."""
    pid = tl.program_id(0)
    tl.debug_barrier()  # this program's data stores come before its signal
    for peer in tl.static_range(WORLD):
        flags = _pick(peer_flags, peer, SLOTS).to(tl.pointer_type(tl.int64))
        tl.atomic_xchg(flags + pid * SLOTS + rank, epoch, sem="release", scope="sys")
    abort = abort_at.to(tl.pointer_type(tl.int32))  # in pinned host memory
    for peer in tl.static_range(WORLD):
        seen = tl.atomic_add(flags_ptr + pid * SLOTS + peer, 0, sem="acquire", scope="sys")
        spins = 0
        while seen < epoch:
            seen = tl.atomic_add(flags_ptr + pid * SLOTS + peer, 0, sem="acquire", scope="sys")
            spins += 1
            if spins % ABORT_POLL == 0:  # noqa: SIM102 - a read over PCIe, only now and then
                if tl.load(abort, volatile=True) != 0:
                    seen = epoch
    tl.debug_barrier()  # every thread's loads below come after the wait


@triton.jit
def _one_shot_kernel(
    x_ptr, out_ptr, data_ptr, peer_data_ptr, flags_ptr, peer_flags_ptr, abort_at_ptr, epoch_ptr,
    n, half, hidden, rank,
    WORLD: tl.constexpr, SLOTS: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr,
    PUSH: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`half`: the elements of a data half (pull), of a slot (PUSH)."""
    release_next(PDL)
    peer_data, peer_flags, abort_at = _addresses(
        peer_data_ptr, peer_flags_ptr, abort_at_ptr, WORLD, SLOTS
    )
    wait_prior(PDL)
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    if TOP_K == 1:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    else:  # x is (T, TOP_K, hidden): its rows of a token summed first, as torch.sum rounds
        token = offs // hidden
        first = token * (TOP_K * hidden) + (offs - token * hidden)
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            total += tl.load(x_ptr + first + k * hidden, mask=mask, other=0.0).to(tl.float32)
        x = total.to(out_ptr.dtype.element_ty)
    if PUSH:
        total = _push_exchange(
            x, offs, mask, offs < half, data_ptr, peer_data,
            abort_at, epoch_ptr, half, rank, WORLD, SLOTS, True,
        )  # fmt: skip
    else:
        total = _exchange(
            x, offs, mask, data_ptr, peer_data, peer_flags, abort_at, flags_ptr, epoch_ptr, half,
            rank, WORLD, SLOTS,
        )  # fmt: skip
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _exchange(
    x, offs, mask, data_ptr, peer_data, peer_flags, abort_at, flags_ptr, epoch_ptr, half,
    rank, WORLD: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """This program's call: x stored at `offs` of the data half of the call's parity, the
    group's barrier, then every rank's copy summed in rank order (float32). Its epoch and
    flags are the program's (one per chunk, or per row). `peer_data`, `peer_flags`,
    `abort_at`: from `_addresses`."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    tl.store(epoch_ptr + pid, epoch)
    parity = (epoch % 2) * half
    tl.store(data_ptr + parity + offs, x, mask=mask)
    _signal_and_wait(flags_ptr, peer_flags, abort_at, epoch, rank, WORLD, SLOTS)
    return _sum_ranks(x, peer_data, parity + offs, mask, rank, WORLD, SLOTS)


@triton.jit
def _empty(v):
    """Where v holds the empty mark, -0.0 (any float dtype)."""
    return v.to(tl.float32).to(tl.int32, bitcast=True) == -2147483648


@triton.jit
def _empty_mark(x):
    """The empty mark in x's shape and dtype: -0.0 from its bits (a -0.0 constant compiles to
    +0.0 on the GPU)."""
    return tl.full(x.shape, -2147483648, tl.int32).to(tl.float32, bitcast=True).to(x.dtype)


@triton.jit
def _send(x, offs, mask, third, peer_data, slot, rank, WORLD: tl.constexpr, SLOTS: tl.constexpr):
    """x stored at `offs` of slot `rank` of `third` of every peer's push data (-0.0, the
    empty mark, sent as +0.0)."""
    sent = tl.where(x == 0, tl.zeros_like(x), x)
    for peer in tl.static_range(WORLD):
        if peer != rank:
            base = _pick(peer_data, peer, SLOTS).to(tl.pointer_type(x.dtype))
            base = tl.multiple_of(base, 16)
            tl.store(base + third + rank * slot + offs, sent, mask=mask)


@triton.jit
def push_row(
    y, row, cols, mask, width, peer_data, epoch_ptr, slot, rank,
    WORLD: tl.constexpr, SLOTS: tl.constexpr,
):  # fmt: skip
    """Columns `cols` of row `row` (of `width`) of a rank's part of a sum, sent as
    `one_shot_all_reduce_norm` would send them, for its call with `pushed=True` to read
    (kernels/gemv.py pushes its output this way). Reads the row's epoch: only after the PDL
    wait. `peer_data`: the group's data addresses (`peer_table`)."""
    epoch = tl.load(epoch_ptr + row) + 1
    third = (epoch % 3) * WORLD * slot
    _send(y, row * width + cols, mask, third, peer_data, slot, rank, WORLD, SLOTS)


@triton.jit
def peer_table(peer_data_ptr, WORLD: tl.constexpr, SLOTS: tl.constexpr):
    """The group's data addresses, (SLOTS,) int64 (constant: load before the PDL wait)."""
    slots = tl.arange(0, SLOTS)
    return tl.load(peer_data_ptr + slots, mask=slots < WORLD, other=0)


@triton.jit
def _push_exchange(
    x, offs, mask, own, data_ptr, peer_data, abort_at, epoch_ptr, slot, rank,
    WORLD: tl.constexpr, SLOTS: tl.constexpr, SEND: tl.constexpr,
):  # fmt: skip
    """This program's call over push buffers: x stored into slot `rank` of the call's third
    of every peer's data (not SEND: the kernel before did, `push_row`), then every peer's
    slot of this rank's third read until it holds no empty mark, and summed in rank order
    (float32; this rank's own x in its place). Then the third of the call before is marked
    empty again, all of this program's chunk (`own`: its elements within a slot, whatever
    this call's size): a later call of another size must not find a stale value there.
    `peer_data`, `abort_at`: from `_addresses`."""
    pid = tl.program_id(0)
    epoch = tl.load(epoch_ptr + pid) + 1
    tl.store(epoch_ptr + pid, epoch)
    third = (epoch % 3) * WORLD * slot
    if SEND:
        _send(x, offs, mask, third, peer_data, slot, rank, WORLD, SLOTS)
    abort = abort_at.to(tl.pointer_type(tl.int32))  # in pinned host memory
    acc = tl.zeros(x.shape, dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            acc += x.to(tl.float32)
        else:
            at = data_ptr + third + peer * slot + offs
            part = tl.load(at, mask=mask, other=0.0, volatile=True)
            waiting = tl.sum((_empty(part) & mask).to(tl.int32), 0)
            spins = 0
            while waiting > 0:
                part = tl.load(at, mask=mask, other=0.0, volatile=True)
                waiting = tl.sum((_empty(part) & mask).to(tl.int32), 0)
                spins += 1
                if spins % ABORT_POLL == 0:  # noqa: SIM102 - a read over PCIe, only now and then
                    if tl.load(abort, volatile=True) != 0:
                        waiting = 0
            acc += part.to(tl.float32)
    before = ((epoch + 2) % 3) * WORLD * slot
    for peer in tl.static_range(WORLD):
        if peer != rank:
            tl.store(data_ptr + before + peer * slot + offs, _empty_mark(x), mask=own)
    return acc


@triton.jit
def _sum_ranks(x, peer_data, at, mask, rank, WORLD: tl.constexpr, SLOTS: tl.constexpr):
    """Every rank's copy at `at` of its data half (this rank's: x) summed in rank order,
    float32. `peer_data`: the ranks' data addresses (`_addresses`)."""
    acc = tl.zeros(x.shape, dtype=tl.float32)
    for peer in tl.static_range(WORLD):
        if peer == rank:
            acc += x.to(tl.float32)
        else:
            base = _pick(peer_data, peer, SLOTS).to(tl.pointer_type(x.dtype))
            base = tl.multiple_of(base, 16)  # a torch allocation: 16-byte vector loads
            part = tl.load(base + at, mask=mask, other=0.0, cache_modifier=".cv")
            acc += part.to(tl.float32)
    return acc


@triton.jit
def _one_shot_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, new_residual_ptr,
    data_ptr, peer_data_ptr, flags_ptr, peer_flags_ptr, abort_at_ptr, epoch_ptr,
    hidden, half, rank, eps,
    WORLD: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr, PUSH: tl.constexpr,
    PUSHED: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    """`_one_shot_kernel` with one program per row (its flags and epochs per row), then the
    residual add and the RMSNorm of kernels/rms_norm.py on the summed row. A push's program
    marks empty the row it reads (the same `hidden` every call: `one_shot_all_reduce_norm`
    holds its buffers to one). PUSHED: the kernel before sent x already (`push_row`)."""
    release_next(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < hidden
    offs = row * hidden + cols
    # constant: before the wait (the weight as the norm's kernel loads it)
    peer_data, peer_flags, abort_at = _addresses(
        peer_data_ptr, peer_flags_ptr, abort_at_ptr, WORLD, SLOTS
    )
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    wait_prior(PDL)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    # the residual before the exchange's stores and spins (its load would otherwise start
    # only once they are over)
    residual = tl.load(residual_ptr + offs, mask=mask, other=0.0)
    if PUSH:
        total = _push_exchange(
            x, offs, mask, mask, data_ptr, peer_data, abort_at, epoch_ptr, half, rank, WORLD,
            SLOTS, not PUSHED,
        ).to(x.dtype)  # fmt: skip
    else:
        total = _exchange(
            x, offs, mask, data_ptr, peer_data, peer_flags, abort_at, flags_ptr, epoch_ptr,
            half, rank, WORLD, SLOTS,
        ).to(x.dtype)  # fmt: skip
    summed = add_rounded(total, residual)
    tl.store(new_residual_ptr + offs, summed, mask=mask)
    out = normalized(summed, w, hidden, eps, False)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


class PeerBuffers:
    """One rank's view of the group's buffers: its own `data` and `flags` (MAX_PROGRAMS,
    MAX_RANKS) int64, and every rank's addresses of them (peers' mapped into this process),
    as int64 device tensors the kernel reads. `data` (2, capacity) pulls; (3, world,
    capacity), filled with -0.0 (`push_data`), pushes (the module's docstring), and its
    flags are not used."""

    def __init__(
        self,
        rank: int,
        data: torch.Tensor,
        flags: torch.Tensor,
        data_addresses: list[int],
        flag_addresses: list[int],
    ) -> None:
        assert len(data_addresses) == len(flag_addresses) <= MAX_RANKS
        self.rank, self.world = rank, len(data_addresses)
        self.push = data.dim() == 3
        assert data.shape[:-1] == ((3, self.world) if self.push else (2,)) and data.is_contiguous()
        assert flags.dtype == torch.int64 and flags.shape[1] == MAX_RANKS
        self.data, self.flags = data, flags
        device = data.device
        self.peer_data = torch.tensor(data_addresses, dtype=torch.int64, device=device)
        self.peer_flags = torch.tensor(flag_addresses, dtype=torch.int64, device=device)
        self.epochs = torch.zeros(flags.shape[0], dtype=torch.int64, device=device)
        self.row_width = 0
        """The width of the rows `one_shot_all_reduce_norm` takes (0: none yet)."""
        # The abort word lives in host memory the GPU reads directly (pinned), so that the
        # host can release a kernel that waits for a dead peer while the stream is stuck.
        self.abort_word = torch.zeros(1, dtype=torch.int32, pin_memory=data.is_cuda)
        self.abort_at = torch.tensor([self.abort_word.data_ptr()], dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Back to new: every element empty, no call made. Only with no call of the group in
        flight, on every rank, between barriers (no peer may push into these meanwhile)."""
        if self.push:
            self.data.fill_(-0.0)
        else:
            self.data.zero_()
        self.flags.zero_()
        self.epochs.zero_()
        self.row_width = 0

    def abort(self) -> None:
        """Release every wait of this rank's calls, now and later: their sums are garbage
        from then on (for a group being torn down after a rank died)."""
        self.abort_word[0] = 1

    def takes_rows(self, rows: int, width: int, dtype: torch.dtype) -> bool:
        """Whether `one_shot_all_reduce_norm` takes (rows, width) of dtype over these."""
        return (
            dtype == self.data.dtype
            and 0 < rows <= self.flags.shape[0]
            and rows * width <= self.data.shape[-1]
            and self.row_width in (0, width)
        )

    @property
    def capacity(self) -> int:
        """The most elements one call takes."""
        return min(self.data.shape[-1], self.flags.shape[0] * BLOCK)


def push_data(world: int, capacity: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A rank's data for push buffers: three thirds of `world` slots, every element empty."""
    return torch.full((3, world, capacity), -0.0, dtype=dtype, device=device)


def one_shot_all_reduce(x: torch.Tensor, buffers: PeerBuffers, top_k: int = 1) -> torch.Tensor:
    """The sum of `x` over the group, in a new tensor; every rank of the group must call it
    with a tensor of the same size and dtype, in the same order as its other calls. With
    `top_k` > 1, x is (T, top_k, H) and the result (T, H) sums over both the ranks and dim 1
    (a mixture-of-experts layer's expert outputs: torch.sum(dim=1)'s bits, then the ranks')."""
    assert x.is_contiguous() and x.dtype == buffers.data.dtype
    if top_k == 1:
        shape, hidden = x.shape, 1
    else:
        assert x.dim() == 3 and x.shape[1] == top_k, "x: (T, top_k, H)"
        shape, hidden = (x.shape[0], x.shape[2]), x.shape[2]
    n = x.numel() // top_k
    assert 0 < n <= buffers.capacity, "message larger than the peer buffers"
    out = torch.empty(shape, dtype=x.dtype, device=x.device)
    _one_shot_kernel[(triton.cdiv(n, BLOCK),)](
        x, out, buffers.data, buffers.peer_data, buffers.flags, buffers.peer_flags,
        buffers.abort_at, buffers.epochs, n, buffers.data.shape[-1], hidden, buffers.rank,
        WORLD=buffers.world, SLOTS=MAX_RANKS, TOP_K=top_k, BLOCK=BLOCK, PUSH=buffers.push,
        num_warps=4, **pdl_args(x),
    )  # fmt: skip
    return out


def one_shot_all_reduce_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
    buffers: PeerBuffers, pushed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """`rms_norm(one_shot_all_reduce(x), weight, eps, residual)` in one launch: (the norm
    of the group's sum of x plus residual, that sum plus residual), x and residual (T, H)
    with dense rows in weight's dtype. One program per row: `buffers` of at least T flag
    rows, never shared with `one_shot_all_reduce` calls (whose programs cover other parts
    of the data: the halves alternate per program). `pushed`: the kernel that wrote x
    sent it to the peers already (`gemv(..., push=buffers)`), push buffers only."""
    assert buffers.push or not pushed, "only push buffers take pushed rows"
    assert x.dim() == 2 and x.is_contiguous() and x.dtype == buffers.data.dtype
    assert residual.shape == x.shape and residual.is_contiguous() and residual.dtype == x.dtype
    assert weight.shape == (x.shape[1],) and weight.dtype == x.dtype and weight.is_contiguous()
    rows, hidden = x.shape
    assert 0 < rows <= buffers.flags.shape[0] and x.numel() <= buffers.data.shape[-1], (
        "message larger than the peer buffers"
    )
    # a push's program clears the row it read, at this width: a later call of another width
    # could find a stale value of the row before (the engine's calls all have one)
    buffers.row_width = buffers.row_width or hidden
    assert hidden == buffers.row_width, "one width of rows per buffers"
    out, new_residual = torch.empty_like(x), torch.empty_like(x)
    block = triton.next_power_of_2(hidden)
    _one_shot_norm_kernel[(rows,)](
        x, residual, weight, out, new_residual,
        buffers.data, buffers.peer_data, buffers.flags, buffers.peer_flags, buffers.abort_at,
        buffers.epochs, hidden, buffers.data.shape[-1], buffers.rank, eps,
        WORLD=buffers.world, SLOTS=MAX_RANKS, BLOCK_H=block, PUSH=buffers.push, PUSHED=pushed,
        num_warps=min(16, max(4, block // 512)), **pdl_args(x),
    )  # fmt: skip
    return out, new_residual
