"""Ranks 1..N-1 of a tensor-parallel group: processes that rank 0 spawns, each holding its
shard of the model, running every step rank 0 sends them until it says stop.

They never sample or schedule: rank 0 owns the scheduler, the block manager and the
sampler, so the other ranks only need each step's integer arrays (see step_plan.py).
"""

from __future__ import annotations

import contextlib
import faulthandler
import multiprocessing
import os
import signal
import sys
import threading
import traceback
from multiprocessing.connection import Connection

import torch

from mii.engine.model_runner import ModelRunner
from mii.engine.tp.group import RankSpec, connect_store, join_group, leave_group


def follower_main(rank: int, spec: RankSpec, conn: Connection) -> None:
    """Entry point of a spawned rank; reports its progress and any failure through `conn`."""
    # Rank 0 alone decides when the group stops: a Ctrl-C or SIGTERM sent to the whole
    # process group must let a worker drain its requests, not kill its ranks under it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # `kill -USR1` prints where each thread of this rank is (a rank stuck in a collective).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    _exit_with_parent()
    try:
        _serve(rank, spec, conn)
    except BaseException:
        error = traceback.format_exc()
        print(f"mii tensor-parallel rank {rank}:\n{error}", file=sys.stderr, flush=True)
        _report(conn, ("error", error))
        os._exit(1)  # at once: tearing down a process group stuck in a collective can hang
    leave_group()


def _serve(rank: int, spec: RankSpec, conn: Connection) -> None:
    device = spec.device(rank)
    if device.type == "cpu":
        share_cpu_cores(torch.get_num_threads(), spec.world_size)
    _report(conn, ("state", "joining"))
    store = connect_store(spec.port, spec.world_size)
    tp, control = join_group(rank, spec.world_size, store, device)
    runner = ModelRunner(
        spec.rank_config(rank),
        spec.hf_config,
        spec.model_path,
        spec.dtype,
        spec.max_positions,
        tp,
        spec.random_weights,
    )
    _report(conn, ("state", "ready"))
    while (plan := control.receive()) is not None:
        runner.execute(plan)
    runner.close()


def share_cpu_cores(threads: int, world_size: int) -> int:
    """Give this rank its share of the cores: ranks spinning on the same cores in their
    OpenMP barriers slow every collective down. Returns the previous thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads // world_size))
    return previous


def _report(conn: Connection, message: tuple) -> None:
    with contextlib.suppress(OSError):  # rank 0 is gone; the parent watch ends this process
        conn.send(message)


def _exit_with_parent() -> None:
    """End this rank as soon as rank 0's process ends, however it ends, even when this rank
    is blocked inside a collective that would otherwise wait for it forever."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="mii-tp-parent-watch", daemon=True).start()
