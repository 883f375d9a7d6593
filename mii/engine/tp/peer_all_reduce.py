"""One-shot all-reduce over NVLink peer memory, for the small messages of decode steps.

A batch-1 decode step of a 7B model all-reduces 8 KB twice per layer; NCCL's ring spends
tens of microseconds on each, which is where tensor parallelism lost most of its batch-1
gain. Here every rank writes its tensor into a buffer that all ranks map (torch's symmetric
memory), and each rank reads every peer's copy and sums them in one kernel: one launch, no
protocol, a few microseconds at these sizes. Large messages (prefill steps) stay on NCCL,
whose bandwidth wins there.

Only peer loads are used: no NVLink multicast (`multimem`), which stays off on these
machines. Anything this path cannot take (no symmetric memory in this torch, no peer access,
an odd dtype or size) goes to NCCL, and a group whose first all-reduce disagrees with NCCL's
never uses it. `MII_PEER_ALL_REDUCE_MAX_BYTES` sets the largest message it takes (0, the
default: off).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
last_failure: str | None = None
"""Why the last `PeerAllReduce.create` on this process left the path closed, if it did."""

DEFAULT_MAX_BYTES = 0
"""Off until measured: on two H200s the path did not open (torch 2.11), and NCCL's LL
protocol took an 8 KB all-reduce in 7.9 us inside CUDA graphs (scripts/bench_all_reduce.py
prints both, and why the path stayed closed). 512 KB is the size to try."""


def max_bytes_setting() -> int:
    return int(os.environ.get("MII_PEER_ALL_REDUCE_MAX_BYTES", DEFAULT_MAX_BYTES))


def _closed(exc: BaseException) -> None:
    global last_failure
    last_failure = f"{type(exc).__name__}: {exc}"
    log.warning("one-shot peer all-reduce unavailable, NCCL for all sizes: %s", last_failure)


def _everywhere(flag: bool, group: Any, device: torch.device) -> bool:
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class PeerAllReduce:
    """Sum-all-reduce of contiguous CUDA tensors of `dtype` up to `max_bytes`."""

    def __init__(self, buffer: torch.Tensor, group_name: str):
        """`buffer`: a symmetric-memory tensor that every rank of the group has mapped."""
        self.buffer = buffer
        self.group_name = group_name
        self._copying = hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy")

    @classmethod
    def create(cls, group: Any, device: torch.device, dtype: torch.dtype) -> PeerAllReduce | None:
        """For an NCCL group of 2-8 ranks on GPUs with peer access; None where that path is
        not open (a collective call: every rank of the group must make it)."""
        max_bytes = max_bytes_setting()
        world = dist.get_world_size(group)
        if (
            max_bytes <= 0
            or device.type != "cuda"
            or dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or not 2 <= world <= 8
            or dist.get_backend(group) != "nccl"
        ):
            return None
        peer = None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            name = group.group_name
            if hasattr(symm_mem, "enable_symm_mem_for_group"):
                symm_mem.enable_symm_mem_for_group(name)
            buffer = symm_mem.empty(max_bytes // dtype.itemsize, dtype=dtype, device=device)
            symm_mem.rendezvous(buffer, name)
            peer = cls(buffer, name)
        except Exception as exc:  # noqa: BLE001 - any failure means: use NCCL
            _closed(exc)
        # Every rank takes the same path, or their collectives would pair up wrongly: the
        # check runs only where every rank mapped the buffer, and counts only if it passed
        # everywhere.
        if not _everywhere(peer is not None, group, device):
            return None
        try:
            peer._check(group, device)
        except Exception as exc:  # noqa: BLE001
            _closed(exc)
            peer = None
        return peer if _everywhere(peer is not None, group, device) else None

    def _check(self, group: Any, device: torch.device) -> None:
        """The first all-reduce agrees with NCCL's, or this path stays closed."""
        rank = dist.get_rank(group)
        x = torch.arange(4096, device=device, dtype=self.buffer.dtype) % 97 + rank
        expected = x.clone()
        dist.all_reduce(expected, group=group)
        got = self(x)
        torch.cuda.synchronize(device)
        if not torch.equal(got, expected):
            raise RuntimeError("peer all-reduce disagreed with NCCL")

    @property
    def max_bytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def fits(self, x: torch.Tensor) -> bool:
        size = x.numel() * x.element_size()
        return (
            x.dtype == self.buffer.dtype
            and x.is_cuda
            and x.is_contiguous()
            and size <= self.max_bytes
            and size % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1)
        if self._copying:
            out = torch.ops.symm_mem.one_shot_all_reduce_copy(
                self.buffer, flat, "sum", self.group_name
            )
        else:
            staged = self.buffer[: flat.numel()]
            staged.copy_(flat)
            out = torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
        return out.view_as(x)
