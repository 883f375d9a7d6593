"""Rank 0 of a tensor-parallel group: the engine's process spawns ranks 1..N-1 (spawn,
never fork), sends them each step's plan before running the step itself, and stops them.

A rank that dies makes the next (or the blocked) step raise `TensorParallelError` within
seconds, so that a worker hosting the engine can exit and let others reclaim its
requests; the other ranks end themselves when rank 0's process ends.
"""

from __future__ import annotations

import atexit
import multiprocessing
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from mii.engine.config import EngineConfig
from mii.engine.loader import build_model
from mii.engine.model_runner import ModelRunner
from mii.engine.step_plan import StepPlan
from mii.engine.tp.context import ParallelContext
from mii.engine.tp.follower import follower_main, share_cpu_cores
from mii.engine.tp.group import (
    INIT_TIMEOUT,
    ControlChannel,
    RankSpec,
    abort_group,
    create_store,
    join_group,
    leave_group,
    plain_config,
)
from mii.errors import TensorParallelError

if TYPE_CHECKING:
    from mii.engine.tp.launched import LaunchedGroup

_FAILURE_GRACE_S = 5.0  # how long a failed collective waits to learn which rank died
_STOP_GRACE_S = 10.0  # how long stopped ranks get to exit before they are killed
_JOINING, _READY = "joining", "ready"


def make_runner(
    config: EngineConfig,
    hf_config: Any,
    model_path: str,
    dtype: torch.dtype,
    max_positions: int,
    tp: ParallelContext,
    random_weights: bool,
) -> ModelRunner:
    """The engine's model runner; with `tensor_parallel > 1`, rank 0 of a group it starts
    (unless `tp` says that the caller runs the group itself: a launcher's processes, whose
    rank 0 leads the others through `tp.leader`)."""
    if tp.leader is not None:
        spec = RankSpec(
            config, plain_config(hf_config), model_path, dtype, max_positions, random_weights
        )
        return TensorParallelRunner(tp.leader.lead(spec), spec)
    if config.tensor_parallel == 1 or tp.world_size > 1:
        return ModelRunner(config, hf_config, model_path, dtype, max_positions, tp, random_weights)
    # A model that does not split evenly fails here, before any process starts.
    build_model(
        hf_config,
        dtype,
        torch.device("meta"),
        ParallelContext(0, config.tensor_parallel),
        max_positions,
    )
    spec = RankSpec(
        config, plain_config(hf_config), model_path, dtype, max_positions, random_weights
    )
    group = TensorParallelGroup.start(spec)
    try:
        with group.guard():
            return TensorParallelRunner(group, spec)
    except BaseException:
        group.close()
        raise


class TensorParallelRunner(ModelRunner):
    """Rank 0's runner: each step's plan goes to the other ranks before rank 0 runs it."""

    def __init__(self, group: TensorParallelGroup | LaunchedGroup, spec: RankSpec) -> None:
        self.group = group
        self._leading = False  # while building, every rank makes the same calls on its own
        super().__init__(
            spec.rank_config(0),
            spec.hf_config,  # the very values the other ranks build from
            spec.model_path,
            spec.dtype,
            spec.max_positions,
            group.context,
            spec.random_weights,
        )
        self._leading = True

    def execute(self, plan: StepPlan, source: torch.Tensor | None = None) -> torch.Tensor | None:
        if not self._leading:
            return super().execute(plan, source)
        with self.group.guard():
            self.group.control.send_plan(plan)
            return super().execute(plan, source)

    def check_step(self) -> None:
        """A rank that died during the step: the one-shot all-reduces that waited for it
        were released by the abort (`abort_group`) and summed stale data, so the step's
        tokens are not the model's."""
        if self._leading:
            self.group.check_step()

    def close(self) -> None:
        super().close()  # the graphs first: they hold NCCL work the group teardown waits on
        self.group.close()


class TensorParallelGroup:
    """The spawned ranks, the thread that watches them, and rank 0's process groups."""

    def __init__(self, processes: list, conns: list[Connection], cpu: bool) -> None:
        self.processes = processes  # rank r is processes[r - 1]
        self.context: ParallelContext | None = None
        self.control: ControlChannel | None = None
        self._states: dict[int, str] = {}
        self._errors: dict[int, str] = {}
        self._failure: str | None = None
        self._broken: BaseException | None = None
        self._closing = False
        self._changed = threading.Condition()
        self._threads = (
            share_cpu_cores(torch.get_num_threads(), len(processes) + 1) if cpu else None
        )
        self._watcher = threading.Thread(
            target=self._watch, args=(conns,), name="mii-tp-watch", daemon=True
        )
        self._watcher.start()
        atexit.register(self.close)

    @classmethod
    def start(cls, spec: RankSpec) -> TensorParallelGroup:
        if dist.is_initialized():
            raise RuntimeError(
                "this process already belongs to a torch.distributed group; a tensor-parallel "
                "engine starts its own (one per process: close the other engine first)"
            )
        world = spec.world_size
        store = create_store(world)
        spec = replace(spec, port=store.port)
        ctx = multiprocessing.get_context("spawn")
        processes, conns = [], []
        with _main_module_hidden():
            for rank in range(1, world):
                receiver, sender = ctx.Pipe(duplex=False)
                proc = ctx.Process(
                    target=follower_main, args=(rank, spec, sender), name=f"mii-tp-rank{rank}"
                )
                proc.start()
                sender.close()
                processes.append(proc)
                conns.append(receiver)
        group = cls(processes, conns, cpu=spec.device(0).type == "cpu")
        try:
            group._await_all(_JOINING)
            with group.guard():
                group.context, group.control = join_group(0, world, store, spec.device(0))
        except BaseException:
            group.close()
            raise
        return group

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    # ---- failures ----------------------------------------------------------------------
    @contextmanager
    def guard(self) -> Iterator[None]:
        """Run collectives; a failure caused by a dead rank comes out as TensorParallelError."""
        self._raise_if_unusable()
        try:
            yield
        except BaseException as exc:
            self._broken = exc  # the other ranks may be inside a collective we left
            if isinstance(exc, RuntimeError):  # what a collective raises when a peer is gone
                with self._changed:
                    self._changed.wait_for(lambda: self._failure is not None, _FAILURE_GRACE_S)
                if self._failure is not None:
                    raise TensorParallelError(self._failure) from exc
            raise  # rank 0's own error (a missing weight, a bad config) speaks for itself

    def check_step(self) -> None:
        """Raise if a rank died or the group fell out of step (after a step's results were
        read back: see `TensorParallelRunner.check_step`)."""
        self._raise_if_unusable()

    def _raise_if_unusable(self) -> None:
        if self._failure is not None:
            raise TensorParallelError(self._failure)
        if self._broken is not None:
            raise TensorParallelError(
                f"the tensor-parallel group is out of step after an earlier error "
                f"({self._broken!r}); close the engine"
            )

    def _await_all(self, state: str) -> None:
        def arrived() -> bool:
            reached = sum(1 for s in self._states.values() if s in (state, _READY))
            return self._failure is not None or reached == len(self.processes)

        with self._changed:
            if not self._changed.wait_for(arrived, INIT_TIMEOUT.total_seconds()):
                raise TensorParallelError(f"tensor-parallel ranks did not reach {state!r} in time")
        self._raise_if_unusable()

    def _watch(self, conns: list[Connection]) -> None:
        """Record what the ranks report, and the first one that exits unasked."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.processes, 1)}
        readers = {conn: rank for rank, conn in enumerate(conns, 1)}
        while sentinels:
            for ready in wait([*sentinels, *readers]):
                if ready in readers:
                    self._read(readers, ready)
                elif ready in sentinels:
                    rank = sentinels.pop(ready)
                    conn = next(c for c, r in readers.items() if r == rank)
                    while conn in readers and conn.poll():
                        self._read(readers, conn)  # its last words: the traceback
                    self._exited(rank)
        for conn in conns:
            conn.close()

    def _read(self, readers: dict[Connection, int], conn: Connection) -> None:
        rank = readers[conn]
        try:
            kind, value = conn.recv()
        except (EOFError, OSError):
            del readers[conn]
            return
        with self._changed:
            if kind == "error":
                self._errors[rank] = value
            else:
                self._states[rank] = value
            self._changed.notify_all()

    def _exited(self, rank: int) -> None:
        proc = self.processes[rank - 1]
        proc.join(1.0)  # reap it, for its exit code
        with self._changed:
            if self._closing or self._failure is not None:
                return
            message = (
                f"tensor-parallel rank {rank} (pid {proc.pid}) exited with code {proc.exitcode}"
            )
            if rank in self._errors:
                message += f":\n{self._errors[rank].rstrip()}"
            self._failure = message
            self._changed.notify_all()
        abort_group()

    # ---- shutdown ----------------------------------------------------------------------
    def close(self) -> None:
        """Stop the other ranks (politely when they are in step, else by SIGKILL) and leave
        the process groups. Safe to call more than once."""
        with self._changed:
            if self._closing:
                return
            self._closing = True
        atexit.unregister(self.close)
        healthy = self._failure is None and self._broken is None and self.control is not None
        if healthy:
            try:
                self.control.send_stop()
            except Exception:
                healthy = False
        # Only the watcher thread reaps the ranks (two threads waiting on one child process
        # race in multiprocessing); it ends when the last rank has exited.
        self._watcher.join(_STOP_GRACE_S if healthy else 0)
        if self._watcher.is_alive():  # the ranks ignore SIGTERM (see tp/follower.py)
            for proc in self.processes:
                proc.kill()
            self._watcher.join(_STOP_GRACE_S)
        if not healthy:
            abort_group()  # collectives left half-done would block the teardown
        leave_group()
        if self._threads is not None:
            torch.set_num_threads(self._threads)


@contextmanager
def _main_module_hidden() -> Iterator[None]:
    """Spawned ranks start from this package alone. Without this, spawn re-imports the
    caller's main script in each child, which re-runs a script's unguarded top level
    (`pipe = mii.pipeline(...)` outside `if __name__ == "__main__":`) and fails there."""
    namespace = sys.modules["__main__"].__dict__
    saved = {k: namespace.pop(k) for k in ("__spec__", "__file__") if k in namespace}
    namespace["__spec__"] = None
    try:
        yield
    finally:
        namespace.pop("__spec__")
        namespace.update(saved)
