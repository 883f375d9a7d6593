"""One-shot all-reduce over NVLink peer memory, for the small messages of decode steps.

A batch-1 decode step of a 7B model all-reduces 8 KB twice per layer; NCCL's ring spends
6-8 us on each inside CUDA graphs, which is where tensor parallelism lost much of its batch-1
gain. Here every rank maps every other rank's buffers (CUDA IPC, as torch.multiprocessing
shares CUDA tensors) and one Triton kernel per call copies the input in, signals the peers,
and sums every rank's copy (`mii/kernels/all_reduce.py`): one launch, no protocol. Large
messages (prefill steps) stay on NCCL, whose bandwidth wins there.

Only peer loads and stores are used: no NVLink multicast (`multimem`), which stays off on
these machines. Anything this path cannot take (no peer access, an odd dtype or size) goes
to NCCL, and a group whose first all-reduce disagrees with NCCL's never uses it.
`MII_PEER_ALL_REDUCE_MAX_BYTES` sets the largest message it takes (0: off; 512 KB unset).

The flat all-reduce pushes (each rank stores its message into every peer's buffer, and
the data is its own signal: kernels/all_reduce.py); `MII_PEER_ALL_REDUCE_PUSH=0` has it
pull instead (signal the peers, then read their copies).

`add_norm` folds the residual add and RMSNorm that follow a row-parallel projection into
the same launch (`RMSNorm.after_all_reduce`, which the llama layers call), and the group's
first call checks it against NCCL and rms_norm too. With push buffers, the output and down
projections' one-row GEMVs send their rows to the peers themselves as they store them
(`gemv_push`, `LinearBase.push_to`), and `add_norm` only reads and sums. On two H200s
(Mistral-7B shape, batch 1, docs/performance.md) these took TP=2 from 2.47 ms a token to
2.44 (the fold) and 2.40 (the fold and the GEMVs' push). On by default;
`MII_PEER_ALL_REDUCE_NORM=0` turns both off, `MII_PEER_GEMV_PUSH=0` the GEMVs' push.
"""

from __future__ import annotations

import logging
import os
import weakref
from typing import Any

import torch
import torch.distributed as dist
from triton import cdiv as triton_cdiv

from mii.kernels.all_reduce import (
    BLOCK,
    MAX_RANKS,
    PeerBuffers,
    one_shot_all_reduce,
    one_shot_all_reduce_norm,
    push_data,
)

log = logging.getLogger(__name__)
last_failure: str | None = None
"""Why the last `PeerAllReduce.create` on this process left the path closed, if it did."""

DEFAULT_MAX_BYTES = 512 * 1024
"""Two H200s (NV18), 2026-11-27, in CUDA graphs (scripts/bench_all_reduce.py): 4.9 us
against NCCL's 7.9 at 8 KB, 8.0 against 11.5 at 512 KB; batch 1 in the engine
(bench_tp.py --peer-bytes 524288) Mistral-7B TP=2 3.11 ms/token against 3.27, Mixtral-8x7B
4.64 against 5.03 (bench_moe_engine.py). Larger messages (prefill steps) stay on NCCL."""


_open_paths: weakref.WeakSet = weakref.WeakSet()


def abort_all() -> None:
    """Release every wait of this process's one-shot all-reduces (a rank died: the calls
    waiting for its signal would spin forever, as NCCL's wait for it does until aborted)."""
    for path in list(_open_paths):
        for buffers in (path.buffers, path.norm_buffers):
            if buffers is not None:
                buffers.abort()


NORM_ROWS = 256
"""The most rows (tokens) `add_norm` takes: a decode step's batch at most (CUDA graphs
cover 256)."""
LARGEST_BYTES = 512 * 1024
"""The largest setting taken; above it, this. Validated up to 512 KB on two H200s; a run of
scripts/bench_all_reduce.py with 4 MB buffers did not finish within 120 s there (cause not
found; with 512 KB buffers every size finished in 13 s), and NCCL's bandwidth wins at such
sizes anyway."""


def max_bytes_setting() -> int:
    value = int(os.environ.get("MII_PEER_ALL_REDUCE_MAX_BYTES", DEFAULT_MAX_BYTES))
    if value > LARGEST_BYTES:
        log.warning(
            "MII_PEER_ALL_REDUCE_MAX_BYTES=%d is above the %d validated: using %d",
            value, LARGEST_BYTES, LARGEST_BYTES,
        )  # fmt: skip
        return LARGEST_BYTES
    return value


def push_setting() -> bool:
    """Whether the flat all-reduce pushes (`MII_PEER_ALL_REDUCE_PUSH`, on unless 0)."""
    return os.environ.get("MII_PEER_ALL_REDUCE_PUSH", "1") != "0"


def _closed(exc: BaseException) -> None:
    global last_failure
    last_failure = f"{type(exc).__name__}: {exc}"
    log.warning("one-shot peer all-reduce unavailable, NCCL for all sizes: %s", last_failure)


def _everywhere(flag: bool, group: Any, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


_STORAGE_DEVICE = 6
"""The device's place in torch.multiprocessing's rebuild arguments of a CUDA tensor."""


def _map_group(tensors: list[torch.Tensor], group: Any) -> tuple[list[list[int]], list]:
    """Every rank's addresses of each of `tensors` (this rank's own, the peers' opened in
    this process through CUDA IPC), and the opened tensors, which keep the mappings.

    A peer's buffer is opened with this rank's device current, not the peer's: CUDA maps it
    into the current device's context and enables that device's peer access to it, which
    is what this rank's kernels need (opened on the peer's index, torch's default for a
    shared tensor, the mapping lands in a second context of this process, and this rank's
    kernels reading it fault with an illegal address: two H200s, 2026-11-27)."""
    from torch.multiprocessing.reductions import reduce_tensor

    torch.cuda.synchronize()
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    own_device = tensors[0].device.index
    shared = [reduce_tensor(t)[1] for t in tensors]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, shared, group=group)
    rebuild = reduce_tensor(tensors[0])[0]
    assert rebuild.__name__ == "rebuild_cuda_tensor" and len(shared[0]) == 15, "torch changed"
    opened, addresses = [], [[0] * world for _ in tensors]
    for peer in range(world):
        for i, own in enumerate(tensors):
            if peer == rank:
                t = own
            else:
                args = list(everyone[peer][i])
                where = args[_STORAGE_DEVICE]
                if where != own_device and not torch.cuda.can_device_access_peer(own_device, where):
                    raise RuntimeError(f"GPU {own_device} cannot reach GPU {where}'s memory")
                args[_STORAGE_DEVICE] = own_device
                t = rebuild(*args)
            opened.append(t)
            addresses[i][peer] = t.data_ptr()
    return addresses, opened


class PeerAllReduce:
    """Sum-all-reduce of contiguous CUDA tensors of one dtype up to `max_bytes`."""

    def __init__(
        self, buffers: PeerBuffers, norm_buffers: PeerBuffers | None, mapped: list
    ) -> None:
        self.buffers = buffers
        # `add_norm`'s (its programs cover rows, not chunks); None: MII_PEER_ALL_REDUCE_NORM=0
        self.norm_buffers = norm_buffers
        self._mapped = mapped  # the peers' buffers opened here: the mapping lives with them
        _open_paths.add(self)

    @classmethod
    def create(
        cls, group: Any, device: torch.device, dtype: torch.dtype, push: bool | None = None
    ) -> PeerAllReduce | None:
        """For an NCCL group of 2-8 ranks on GPUs with peer access; None where that path is
        not open (a collective call: every rank of the group must make it). `push`: the
        flat all-reduce's buffers push (None: `MII_PEER_ALL_REDUCE_PUSH`)."""
        max_bytes = max_bytes_setting()
        world = dist.get_world_size(group)
        if (
            max_bytes <= 0
            or device.type != "cuda"
            or dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or not 2 <= world <= MAX_RANKS
            or dist.get_backend(group) != "nccl"
        ):
            return None
        peer, push = None, push_setting() if push is None else push
        try:
            peer = cls._open(group, device, dtype, max_bytes, push)
        except Exception as exc:  # noqa: BLE001 - any failure means: use NCCL
            _closed(exc)
        # Every rank takes the same path, or their collectives would pair up wrongly: the
        # check runs only where every rank mapped the buffers, and counts only if it passed
        # everywhere.
        if not _everywhere(peer is not None, group, device):
            return None
        try:
            peer._check(group, device)
        except Exception as exc:  # noqa: BLE001
            _closed(exc)
            peer = None
        return peer if _everywhere(peer is not None, group, device) else None

    @classmethod
    def _open(
        cls, group: Any, device: torch.device, dtype: torch.dtype, max_bytes: int, push: bool
    ):  # fmt: skip
        elems = max_bytes // dtype.itemsize
        norm = os.environ.get("MII_PEER_ALL_REDUCE_NORM", "1") != "0"
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        # A (data, flags) pair per kernel: the flat one's flags (a push: only its programs'
        # epochs) per BLOCK chunk, add_norm's per row.
        flag_rows = [triton_cdiv(elems, BLOCK)] + ([NORM_ROWS] if norm else [])
        pairs = [
            (push_data(world, elems, dtype, device) if push
             else torch.zeros((2, elems), dtype=dtype, device=device),
             torch.zeros((rows, MAX_RANKS), dtype=torch.int64, device=device))
            for rows in flag_rows
        ]  # fmt: skip
        addresses, mapped = _map_group([t for pair in pairs for t in pair], group)
        buffers = [
            PeerBuffers(rank, data, flags, addresses[2 * i], addresses[2 * i + 1])
            for i, (data, flags) in enumerate(pairs)
        ]
        return cls(buffers[0], buffers[1] if norm else None, mapped)

    def _check(self, group: Any, device: torch.device) -> None:
        """The first all-reduce agrees with NCCL's, or this path stays closed."""
        rank, agreed = dist.get_rank(group), True
        # Four calls: past the push buffers' third third, back to the first. Every rank makes
        # all of them whatever it finds (a rank that stopped early would leave its peers
        # waiting for its data, and pair their collectives wrongly).
        for call in range(4):
            x = torch.arange(4096, device=device, dtype=self.buffers.data.dtype) % 97 + rank
            x = x - 48 + call
            expected = x.clone()
            dist.all_reduce(expected, group=group)
            agreed &= torch.equal(self(x), expected)
        if not _everywhere(agreed, group, device):  # or a rank would go on to the norm's check
            raise RuntimeError("peer all-reduce disagreed with NCCL")
        if self.norm_buffers is not None:
            self._check_norm(x, expected, group, device)

    def _check_norm(
        self, x: torch.Tensor, expected: torch.Tensor, group: Any, device: torch.device
    ) -> None:
        from mii.kernels.rms_norm import rms_norm

        rows = x.view(2, -1)
        weight = torch.linspace(0.5, 1.5, rows.shape[1], device=x.device, dtype=rows.dtype)
        normed = self.add_norm(rows, rows, weight, 1e-5)
        agreed = all(
            torch.equal(a, b)
            for a, b in zip(normed, rms_norm(expected.view(2, -1), weight, 1e-5, rows), strict=True)
        )  # fmt: skip
        # The engine's rows are wider than the check's: the buffers start over at its width.
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        self.norm_buffers.reset()
        torch.cuda.synchronize(device)
        dist.barrier(group=group)
        if not _everywhere(agreed, group, device):
            raise RuntimeError("peer all-reduce with the norm disagreed with NCCL and rms_norm")

    @property
    def max_bytes(self) -> int:
        return self.buffers.capacity * self.buffers.data.element_size()

    def fits(self, x: torch.Tensor, top_k: int = 1) -> bool:
        """Whether `self(x, top_k)` takes x: its result no larger than the buffers."""
        return (
            x.dtype == self.buffers.data.dtype
            and x.is_cuda
            and x.is_contiguous()
            and 0 < x.numel() * x.element_size() // top_k <= self.max_bytes
        )

    def fits_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether `add_norm(x, residual, weight, eps)` takes them (not with
        `MII_PEER_ALL_REDUCE_NORM=0`)."""
        return (
            self.norm_buffers is not None
            and x.dim() == 2
            and self.fits(x)
            and self.norm_buffers.takes_rows(x.shape[0], x.shape[1], x.dtype)
            and residual.shape == x.shape
            and residual.dtype == x.dtype
            and residual.is_contiguous()
            and weight.dtype == x.dtype
            and weight.is_contiguous()
        )

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
        pushed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(RMSNorm(sum over the group of x + residual) * weight, that sum + residual) in one
        launch: what `all_reduce` then the fused residual-add RMSNorm give, bit for bit.
        `pushed`: x is a GEMV's output that it sent to the peers already (`gemv_push`)."""
        return one_shot_all_reduce_norm(x, residual, weight, eps, self.norm_buffers, pushed)

    @property
    def gemv_push(self) -> PeerBuffers | None:
        """The buffers a row-parallel projection's one-row GEMV sends its rows into, for the
        norm after it (`LinearBase.push_to`): `add_norm`'s, where they push and
        `MII_PEER_GEMV_PUSH` is not 0; else None."""
        buffers = self.norm_buffers
        if buffers is None or not buffers.push:
            return None
        return buffers if os.environ.get("MII_PEER_GEMV_PUSH", "1") != "0" else None

    def __call__(self, x: torch.Tensor, top_k: int = 1) -> torch.Tensor:
        """The sum over the group (with `top_k` > 1: of x (T, top_k, H) over dim 1 too)."""
        return one_shot_all_reduce(x, self.buffers, top_k)
