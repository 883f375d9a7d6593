"""torch.distributed for one tensor-parallel group, the part every rank shares: where each
rank runs, the rendezvous, the model's process group (NCCL on GPU, gloo on CPU), and the
gloo control channel over which rank 0 sends each step's plan."""

from __future__ import annotations

import dataclasses
import logging
import sys
import threading
from dataclasses import dataclass
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mii.engine.config import EngineConfig
from mii.engine.step_plan import StepPlan
from mii.engine.tp.context import ParallelContext

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LEAVE_TIMEOUT_S = 20.0
INIT_TIMEOUT = timedelta(minutes=5)
# The other ranks wait on the control channel for as long as rank 0 has no work: it must
# not time out while a worker idles.
CONTROL_TIMEOUT = timedelta(days=365)
_INLINE_WORDS = 1024  # the first broadcast of a message; a decode step's plan fits in it
_STOP, _STEP, _IDLE = 0, 1, 2


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to build its share of the model (sent to spawned ranks)."""

    config: EngineConfig
    hf_config: SimpleNamespace
    """The model's config as plain values (see `plain_config`)."""
    model_path: str
    dtype: torch.dtype
    max_positions: int
    random_weights: bool
    port: int = 0
    """The rendezvous store's port on the loopback interface."""

    @property
    def world_size(self) -> int:
        return self.config.tensor_parallel

    def device(self, rank: int) -> torch.device:
        base = self.config.torch_device
        if base.type != "cuda":
            return base
        ids = self.config.device_ids
        if ids is None:
            first = base.index or 0
            ids = tuple(range(first, first + self.world_size))
        if len(ids) != self.world_size:
            raise ValueError(
                f"device_ids {ids} name {len(ids)} devices for {self.world_size} ranks"
            )
        return torch.device("cuda", ids[rank])

    def rank_config(self, rank: int) -> EngineConfig:
        """The engine config as rank `rank` sees it: its own device."""
        return dataclasses.replace(self.config, device=str(self.device(rank)))


def plain_config(hf_config: Any) -> SimpleNamespace:
    """A transformers config's plain values, without its class: a spawned rank then starts
    without importing transformers (about 2 s of a rank's start)."""
    values = {k: v for k, v in vars(hf_config).items() if _is_plain(v)}
    values["model_type"] = hf_config.model_type
    for alias in getattr(type(hf_config), "attribute_map", {}):
        values[alias] = getattr(hf_config, alias)
    return SimpleNamespace(**values)


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def create_store(world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store on a free loopback port (port 0: the OS picks one)."""
    return dist.TCPStore(
        LOOPBACK, 0, world_size, is_master=True, wait_for_workers=False, timeout=INIT_TIMEOUT
    )


def connect_store(port: int, world_size: int) -> dist.TCPStore:
    return dist.TCPStore(LOOPBACK, port, world_size, is_master=False, timeout=INIT_TIMEOUT)


def join_group(
    rank: int, world_size: int, store: dist.TCPStore, device: torch.device
) -> tuple[ParallelContext, ControlChannel]:
    """Join the model's process group and the control channel (a collective call)."""
    if dist.is_initialized():
        raise RuntimeError(
            "this process already belongs to a torch.distributed group: one tensor-parallel "
            "engine per process (close the other engine first)"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return ParallelContext(rank, world_size, dist.group.WORLD), ControlChannel(control)


def leave_group(timeout_s: float = LEAVE_TIMEOUT_S) -> None:
    """Destroy this process's groups. Should NCCL's teardown hang (it waits on work that a
    peer or a captured graph still holds), abort the communicators instead of hanging."""
    if not dist.is_initialized():
        return
    done = threading.Event()

    def destroy() -> None:
        dist.destroy_process_group()
        done.set()

    threading.Thread(target=destroy, name="mii-tp-leave", daemon=True).start()
    if not done.wait(timeout_s):
        log.warning("process group teardown took over %.0fs; aborting its communicators", timeout_s)
        abort_group()
        done.wait(timeout_s)


def abort_group() -> None:
    """Make collectives blocked on a dead peer return (NCCL waits for it forever otherwise;
    gloo notices the closed connection by itself). Safe from another thread: it aborts the
    NCCL communicators, as NCCL's own watchdog does, and leaves torch's group registry
    alone for `leave_group` to tear down."""
    peer_paths = sys.modules.get("mii.engine.tp.peer_all_reduce")
    if peer_paths is not None:  # their kernels wait on the GPU for the dead rank's signal
        peer_paths.abort_all()
    if dist.is_initialized() and dist.get_backend() == "nccl":
        dist.group.WORLD._get_backend(torch.device("cuda")).abort()


class ControlChannel:
    """Rank 0 broadcasts messages of [command, length, body...] as int64 words: one
    broadcast of a fixed size, a second for the rest of a long message."""

    def __init__(self, group) -> None:
        self.group = group
        self._first = torch.zeros(_INLINE_WORDS, dtype=torch.int64)

    def send_plan(self, plan: StepPlan) -> None:
        self._send(_STEP, plan.pack())

    def send_stop(self) -> None:
        self._send(_STOP, np.zeros(0, dtype=np.int64))

    def send_idle(self, payload: bytes = b"") -> None:
        """Rank 0 has no more steps for now (a launcher's processes: the call ended), with
        `payload` for the other ranks (see `receive_idle`)."""
        padded = payload + b"\0" * (-len(payload) % 8)
        words = np.frombuffer(padded, dtype=np.int64)
        self._send(_IDLE, np.concatenate([[len(payload)], words]).astype(np.int64))

    def _send(self, command: int, body: np.ndarray) -> None:
        message = torch.from_numpy(np.concatenate([[command, len(body)], body]).astype(np.int64))
        head = min(len(message), _INLINE_WORDS)
        self._first[:head] = message[:head]
        dist.broadcast(self._first, src=0, group=self.group)
        if len(message) > _INLINE_WORDS:
            dist.broadcast(message[_INLINE_WORDS:].contiguous(), src=0, group=self.group)

    def receive(self) -> StepPlan | Idle | None:
        """The next step's plan; `Idle` when rank 0 has no more steps for now; None when it
        stops the group."""
        command, body = self._receive()
        if command == _STOP:
            return None
        if command == _IDLE:
            return Idle(body[1:].tobytes()[: int(body[0])])
        return StepPlan.unpack(body)

    def _receive(self) -> tuple[int, np.ndarray]:
        dist.broadcast(self._first, src=0, group=self.group)
        command, length = int(self._first[0]), int(self._first[1])
        body = self._first[2 : 2 + length].clone()
        rest = 2 + length - _INLINE_WORDS
        if rest > 0:
            tail = torch.empty(rest, dtype=torch.int64)
            dist.broadcast(tail, src=0, group=self.group)
            body = torch.cat([body, tail])
        return command, body.numpy()


@dataclass(frozen=True)
class Idle:
    """Rank 0 ended a call of the launcher's processes (`ControlChannel.send_idle`)."""

    payload: bytes
