"""What a launcher (`deepspeed --num_gpus N`, `torchrun --nproc_per_node N`) tells each
process it starts, through the environment: WORLD_SIZE, RANK, LOCAL_RANK, and MASTER_ADDR
and MASTER_PORT for the rendezvous. No torch here: `mii.serve` reads it too."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

LAUNCHER_VARIABLES = (
    "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
    "ROLE_WORLD_SIZE", "CROSS_RANK", "CROSS_SIZE", "MASTER_ADDR", "MASTER_PORT",
)  # fmt: skip
"""What processes that `mii.serve` starts must not inherit: they are no launcher's ranks."""


@dataclass(frozen=True)
class LaunchedRank:
    """This process's place among those a launcher started."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> LaunchedRank | None:
        """From WORLD_SIZE, RANK and LOCAL_RANK; None unless several processes were launched."""
        env = os.environ if environ is None else environ
        world_size = int(env.get("WORLD_SIZE") or 1)
        if world_size <= 1 or "RANK" not in env:
            return None
        rank = int(env["RANK"])
        return cls(rank, world_size, int(env.get("LOCAL_RANK") or rank))


def without_launcher(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment less what a launcher set (for processes that are not its ranks)."""
    drop = set(LAUNCHER_VARIABLES)
    return {k: v for k, v in environ.items() if k not in drop and not k.startswith("TORCHELASTIC_")}
