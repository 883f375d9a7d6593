"""The tensor-parallel group a model runs in, passed explicitly to every TP-aware layer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    group: Any = None
    """The torch.distributed process group; None in a single-process run."""
    leader: Any = None
    """On rank 0 of processes that a launcher started (`tp/launched.py`), their group: the
    engine sends the other ranks each step's plan through it. None otherwise."""
    peer: Any = None
    """A `PeerAllReduce` that takes the small all-reduces on GPUs; None: NCCL takes all."""

    def with_peer_all_reduce(self, device: torch.device, dtype: torch.dtype) -> ParallelContext:
        """This group with the one-shot peer all-reduce for `dtype` where it is open (a
        collective call, made where the model is built)."""
        if self.world_size == 1 or self.peer is not None or device.type != "cuda":
            return self
        from mii.engine.tp.peer_all_reduce import PeerAllReduce

        return dataclasses.replace(self, peer=PeerAllReduce.create(self.group, device, dtype))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks; use the returned tensor (`x` may or may not hold it)."""
        if self.world_size > 1:
            if self.peer is not None and self.peer.fits(x):
                return self.peer(x)
            dist.all_reduce(x, group=self.group)
        return x

    def sum_rows_and_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """x (T, K, H) summed over dim 1 and over the ranks: (T, H). The peer path does both
        in its one launch (a mixture-of-experts layer's per-expert outputs of decode steps)."""
        if x.shape[1] == 1:
            return self.all_reduce(x.view(x.shape[0], x.shape[2]))
        if self.peer is not None and self.peer.fits(x, x.shape[1]):
            return self.peer(x, x.shape[1])
        return self.all_reduce(x.sum(dim=1))

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size > 1:
            dist.broadcast(x, src=src, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate each rank's slice of the last dimension, in rank order."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def min_over_ranks(self, value: int) -> int:
        """The smallest of each rank's `value` (an agreed cache size)."""
        if self.world_size == 1:
            return value
        on_gpu = dist.get_backend(self.group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else None
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def shard(self, size: int, what: str) -> int:
        if size % self.world_size:
            raise ValueError(
                f"{what} ({size}) is not divisible by tensor_parallel={self.world_size}"
            )
        return size // self.world_size


SINGLE = ParallelContext()
