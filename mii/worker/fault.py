"""Surviving a failed engine step: one bad request must not take the worker down.

When `engine.step()` raises, the worker aborts every request of that step (freeing their
KV blocks), reads back what each already published, and queues them again to continue from
there. The blame goes to the requests admitted since the last good step (the newest work
is what most likely broke it; if there is none, every request of the step). Until those
are back in, the worker admits one request a step, so a request that breaks the engine
again is the only new one of its step and is blamed alone. A request blamed for
`max_deliveries` failures, counting the deliveries of its entry, is dead-lettered with the
error for its client.

Some failures leave the engine itself broken (a CUDA error poisons the context, a
tensor-parallel rank died): those, and failures that keep coming without a good step in
between, end the worker with a non-zero exit so that its supervisor restarts it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mii.errors import TensorParallelError

FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "NCCL")
FATAL_TYPES = ("AcceleratorError", "TensorParallelError")


class EngineBroken(RuntimeError):
    """The engine cannot go on; the worker exits non-zero (its requests are reclaimed)."""


def is_fatal(exc: BaseException) -> bool:
    """Whether a step failure leaves the engine unusable (not one request's fault)."""
    if isinstance(exc, TensorParallelError | MemoryError):
        return True
    if type(exc).__name__ in FATAL_TYPES:
        return True
    return any(marker in str(exc) for marker in FATAL_MARKERS)


@dataclass
class StepFailures:
    """Which requests a failed step is blamed on, and how often each was."""

    max_deliveries: int
    max_in_row: int = 8
    """Failed steps with no good step between them before the engine counts as broken."""
    in_row: int = 0
    blamed: dict[str, int] = field(default_factory=dict)
    """Request id -> failed steps blamed on it."""
    admitted: list[str] = field(default_factory=list)
    """Requests admitted since the last good step."""
    suspects: set[str] = field(default_factory=set)
    """Requests of a failed step not yet back in the engine."""

    def note_admitted(self, rid: str) -> None:
        self.admitted.append(rid)
        self.suspects.discard(rid)

    def step_succeeded(self) -> None:
        self.in_row = 0
        self.admitted.clear()

    def failed(self, exc: BaseException, in_step: list[str]) -> set[str]:
        """Record a failed step over these requests; return the ones blamed. Raises
        `EngineBroken` when the engine, not a request, is at fault."""
        self.in_row += 1
        if is_fatal(exc) or self.in_row > self.max_in_row or not in_step:
            raise EngineBroken(f"engine step failed: {type(exc).__name__}: {exc}") from exc
        newest = set(self.admitted) & set(in_step)
        culprits = newest or set(in_step)
        for rid in culprits:
            self.blamed[rid] = self.blamed.get(rid, 0) + 1
        self.suspects.update(in_step)
        self.admitted.clear()
        return culprits

    def exhausted(self, rid: str, deliveries: int) -> bool:
        """Whether a request has used up its attempts (entry deliveries + blamed steps)."""
        return deliveries - 1 + self.blamed.get(rid, 0) >= self.max_deliveries

    def admit_one_at_a_time(self) -> bool:
        """While suspects wait to be re-admitted, each step takes at most one new request."""
        return bool(self.suspects) and bool(self.admitted)

    def forget(self, rid: str) -> None:
        self.blamed.pop(rid, None)
        self.suspects.discard(rid)
