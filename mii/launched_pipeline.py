"""`mii.pipeline` under a launcher (`deepspeed --num_gpus N script.py`, `torchrun
--nproc_per_node N script.py`): the launched processes form one tensor-parallel group of
WORLD_SIZE ranks (`mii.engine.tp.launched`). Every rank runs the same script and makes the
same calls; rank 0 runs the engine and returns the responses, the other ranks run their
shards of each step and return None (or rank 0's responses, with `all_rank_output=True`).

With `tensor_parallel=1`, each launched process runs a pipeline of its own instead (on its
LOCAL_RANK's GPU): data parallelism, the prompts split by the script.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from mii.config import ModelConfig
from mii.engine.tp.launched import Follower, LaunchedGroup, rank_device
from mii.errors import MIIError
from mii.launcher_env import LaunchedRank
from mii.local_pipeline import MIIPipeline
from mii.response import Response


def start_pipeline(config: ModelConfig, all_rank_output: bool = False):
    """This process's pipeline: on its own, or one rank of the launcher's group."""
    rank = LaunchedRank.from_environment()
    if rank is None:
        return MIIPipeline(config, all_rank_output)
    if config.device == "auto":
        config = config.model_copy(update={"device": str(rank_device(rank, "auto"))})
    if config.tensor_parallel == 1:
        return MIIPipeline(config, all_rank_output)
    if config.tensor_parallel != rank.world_size:
        raise ValueError(
            f"tensor_parallel={config.tensor_parallel} under a launcher of "
            f"{rank.world_size} processes: give {rank.world_size} (one group of all of "
            "them, the default) or 1 (a pipeline in each)"
        )
    group = LaunchedGroup(rank, rank_device(rank, config.device))
    if rank.rank == 0:
        return MIIPipeline(config, all_rank_output, lead=LaunchedLead(group, all_rank_output))
    return FollowerPipeline(Follower(group), all_rank_output)


class LaunchedLead:
    """Rank 0's side: the group its engine leads, and the end of each call."""

    def __init__(self, group: LaunchedGroup, all_rank_output: bool) -> None:
        self.group, self.all_rank_output = group, all_rank_output

    def end_call(self, responses: list[Response] | None, error: BaseException | None) -> None:
        """Let the other ranks return: with the responses they are to return, or rank 0's
        error (which they raise too)."""
        outcome: dict = {}
        if error is not None:
            outcome["error"] = f"{type(error).__name__}: {error}"
        elif self.all_rank_output and responses is not None:
            outcome["responses"] = [r.to_msg_dict() for r in responses]
        self.group.end_call(json.dumps(outcome).encode())


class FollowerPipeline:
    """Ranks 1..N-1 of a launcher's group: each call runs rank 0's steps until it ends."""

    def __init__(self, follower: Follower, all_rank_output: bool = False) -> None:
        self.follower, self.all_rank_output = follower, all_rank_output
        self.tokenizer = None

    def __call__(self, prompts, **kwargs) -> list[Response] | None:
        payload = self.follower.follow()
        if payload is None:
            raise MIIError("rank 0 destroyed its pipeline: this rank's pipeline is closed")
        outcome = json.loads(payload)
        if "error" in outcome:
            raise MIIError(f"rank 0 failed: {outcome['error']}")
        if "responses" in outcome:
            return [Response.from_msg_dict(r) for r in outcome["responses"]]
        return None

    def stream(self, prompt, **kwargs) -> Iterator[Response]:
        """Rank 0 streams; this rank runs the steps and yields nothing."""
        self(prompt, **kwargs)
        yield from ()

    def destroy(self) -> None:
        """Wait for rank 0's `destroy`, then leave the group."""
        while self.follower.follow() is not None:
            pass
