"""Tensor parallelism over processes that a launcher started (`deepspeed --num_gpus N`,
`torchrun --nproc_per_node N`): every process runs the user's script, so each one already
is a rank, and together they form one group of WORLD_SIZE ranks (rendezvous through the
launcher's MASTER_ADDR and MASTER_PORT).

As with the ranks an engine spawns (leader.py, follower.py), rank 0 owns the scheduler and
the sampler and sends each step's plan; here the other ranks follow only while rank 0 is
inside a call of the user's script, which every rank makes: rank 0 ends each call with an
`Idle` message (and a payload: the call's outcome), so the other ranks return from theirs.

The processes' default group (torch.distributed's WORLD) lives as long as they do: it is
joined once (or taken as the script made it, e.g. `deepspeed.init_distributed()`) and every
pipeline after the first reuses it, with a control group of its own. Joining the launcher's
rendezvous a second time would meet the first group's leftovers in its store.
"""

from __future__ import annotations

import atexit
import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mii.engine.model_runner import ModelRunner
from mii.engine.tp.context import ParallelContext
from mii.engine.tp.follower import share_cpu_cores
from mii.engine.tp.group import CONTROL_TIMEOUT, ControlChannel, Idle, RankSpec, leave_group
from mii.launcher_env import LaunchedRank


def rank_device(rank: LaunchedRank, device: str) -> torch.device:
    """A launched rank's device for the model's `device` option: its LOCAL_RANK's GPU."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", rank.local_rank)


class LaunchedGroup:
    """The launcher's processes joined into one group: `lead` on rank 0, `Follower` on the
    others. It offers what `TensorParallelRunner` needs of a group (`context`, `control`,
    `guard`, `check_step`, `close`); a rank that dies ends the launcher's job, which ends the
    others."""

    def __init__(self, rank: LaunchedRank, device: torch.device) -> None:
        self.rank, self.device = rank, device
        _join_world(rank, device)
        self.context = ParallelContext(rank.rank, rank.world_size, dist.group.WORLD)
        self.control = ControlChannel(dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
        self._closed = False

    def leader_context(self) -> ParallelContext:
        """What rank 0's engine is built with: the group, and this object to lead it."""
        return dataclasses.replace(self.context, leader=self)

    def lead(self, spec: RankSpec) -> LaunchedGroup:
        """Rank 0: send the other ranks what they build their shards from."""
        dist.broadcast_object_list([spec], src=0, group=self.control.group)
        return self

    def end_call(self, payload: bytes) -> None:
        """Rank 0: the call is over; the other ranks return `payload` from theirs."""
        self.control.send_idle(payload)

    @contextmanager
    def guard(self) -> Iterator[None]:
        yield

    def check_step(self) -> None:
        """Nothing to check: a dead rank ends the launcher's job, this process included."""

    def close(self) -> None:
        """Rank 0: stop the other ranks; every rank drops this pipeline's control group (the
        default group stays for the next pipeline). Safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self.rank.rank == 0:
            self.control.send_stop()
        dist.destroy_process_group(self.control.group)


def _join_world(rank: LaunchedRank, device: torch.device) -> None:
    """Join the launcher's processes (env:// rendezvous), unless this process is already in
    their group; it is left when the process exits."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (rank.rank, rank.world_size):
            raise RuntimeError(
                f"this process is rank {dist.get_rank()} of {dist.get_world_size()} in a "
                f"torch.distributed group, not rank {rank.rank} of {rank.world_size} as "
                "its launcher says"
            )
        return
    if device.type == "cpu":  # the launcher's processes share this host's cores
        share_cpu_cores(torch.get_num_threads(), rank.world_size)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank.rank,
                            world_size=rank.world_size)  # fmt: skip
    atexit.register(leave_group)


class Follower:
    """Ranks 1..N-1: their shard of the model, run on every step rank 0 sends."""

    def __init__(self, group: LaunchedGroup) -> None:
        received: list = [None]
        dist.broadcast_object_list(received, src=0, group=group.control.group)
        spec: RankSpec = received[0]
        config = dataclasses.replace(spec.config, device=str(group.device))
        self.group = group
        self.runner: ModelRunner | None = ModelRunner(
            config, spec.hf_config, spec.model_path, spec.dtype, spec.max_positions,
            group.context, spec.random_weights,
        )  # fmt: skip

    def follow(self) -> bytes | None:
        """Run rank 0's steps until it ends its call (its payload) or stops (None)."""
        if self.runner is None:
            return None
        while (message := self.group.control.receive()) is not None:
            if isinstance(message, Idle):
                return message.payload
            self.runner.execute(message)
        self.close()
        return None

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None
        self.group.close()
