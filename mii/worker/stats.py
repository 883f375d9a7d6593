"""Counters of a worker loop: reported in the worker's status (and later to Celery/Flower)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mii.constants import GenerationFinishReason


@dataclass
class LoopStats:
    received: int = 0  # entries read (new, reclaimed or handed back)
    finished: int = 0  # finished by the engine (stop or length)
    cancelled: int = 0
    timed_out: int = 0
    refused: int = 0  # bad input or dead-lettered: an error went to the client
    deadlettered: int = 0
    reclaimed: int = 0  # taken over from dead workers
    resumed: int = 0  # continued after tokens another worker published
    lost: int = 0  # taken over by another worker while this one stalled
    handed_back: int = 0  # requeued when draining or stopping
    duplicates: int = 0  # second entries of a request id another entry serves: dropped
    step_failures: int = 0  # engine steps that raised and were recovered from
    abandoned: int = 0  # cancelled because their client went away
    steps: int = 0
    busy_s: float = 0.0  # wall time of loop iterations that had engine work
    step_s: float = 0.0  # of which inside engine.step(): the rest is the queue's overhead

    def count_end(self, reason: GenerationFinishReason) -> None:
        if reason == GenerationFinishReason.CANCELLED:
            self.cancelled += 1
        elif reason == GenerationFinishReason.TIMEOUT:
            self.timed_out += 1

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    @property
    def overhead(self) -> float | None:
        """Fraction of busy time the loop spent outside the engine (reads, bookkeeping)."""
        return None if self.busy_s == 0 else 1.0 - self.step_s / self.busy_s
