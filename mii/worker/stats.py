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
    steps: int = 0

    def count_end(self, reason: GenerationFinishReason) -> None:
        if reason == GenerationFinishReason.CANCELLED:
            self.cancelled += 1
        elif reason == GenerationFinishReason.TIMEOUT:
            self.timed_out += 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
