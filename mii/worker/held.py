"""The requests a worker holds, and every way one of them ends.

A request is held from the moment the worker takes its entry until its entry is acked:
first in the backlog (read, waiting for room in the engine), then active (in the engine).
However it ends (finished by the engine, cancelled, timed out, refused, dead-lettered,
terminated), it ends here, so that the engine, the publisher, the statistics and the
observer each hear of it exactly once.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable

from mii.broker_config.wire import ErrorKind
from mii.constants import GenerationFinishReason as Reason
from mii.engine.base import Engine
from mii.engine.outputs import RequestOutput
from mii.errors import InvalidRequestError
from mii.worker import outcomes
from mii.worker.fault import StepFailures
from mii.worker.intake import Admission, Entry, Refusal
from mii.worker.observer import RequestObserver, notify
from mii.worker.outcomes import Batch
from mii.worker.publisher import Publisher
from mii.worker.stats import LoopStats

log = logging.getLogger(__name__)


class HeldRequests:
    def __init__(
        self,
        engine: Engine,
        publisher: Publisher,
        failures: StepFailures,
        stats: LoopStats,
        observer: RequestObserver,
    ) -> None:
        self.engine, self.publisher, self.failures = engine, publisher, failures
        self.stats, self.observer = stats, observer
        self.active: dict[str, Admission] = {}
        self.generated: dict[str, int] = {}  # request id -> tokens generated so far
        self.backlog: deque[tuple[Admission, list[int]]] = deque()  # read, not admitted
        self.typical_prompt = 16  # tokens; a running average, for the engine's room

    # ---- what is held ---------------------------------------------------------------------
    def all(self) -> list[Admission]:
        """Every request held, active ones first."""
        return [*self.active.values(), *(adm for adm, _ in self.backlog)]

    def entry_of(self, rid: str) -> Entry | None:
        """The entry a held request came from, or None when it is not held."""
        return next((adm.entry for adm in self.all() if adm.rid == rid), None)

    def __len__(self) -> int:
        return len(self.active) + len(self.backlog)

    # ---- into the engine ------------------------------------------------------------------
    def queue(self, adm: Admission, tokens: list[int], first: bool = False) -> None:
        """Wait for room in the engine; `tokens` were generated before (a resumed request),
        `first`: ahead of newer work."""
        if first:
            self.backlog.appendleft((adm, tokens))
        else:
            self.backlog.append((adm, tokens))

    def admit(self) -> None:
        """Move backlog requests into the engine while it has room (one at a time while
        the requests of a failed step come back, see `fault`)."""
        while self.backlog and not self.failures.admit_one_at_a_time():
            adm, tokens = self.backlog[0]
            if self.active and not self.engine.can_admit(len(adm.prompt_token_ids) + len(tokens)):
                return
            self.backlog.popleft()
            self._add(adm, tokens)

    def _add(self, adm: Admission, tokens: list[int]) -> None:
        try:
            self.engine.add_request(adm.rid, adm.prompt_token_ids, adm.sampling, tokens)
        except InvalidRequestError as exc:
            self.refuse(Refusal(adm.entry, adm.rid, str(exc)))
            return
        except Exception as exc:  # noqa: BLE001 (the engine refused it some other way)
            error = f"the engine could not take this request: {type(exc).__name__}: {exc}"
            self.refuse(Refusal(adm.entry, adm.rid, error, ErrorKind.GENERATION))
            return
        self.failures.note_admitted(adm.rid)
        self.active[adm.rid] = adm
        self.generated[adm.rid] = len(tokens)
        notify(self.observer, "started", adm.rid)
        self.publisher.refresh_ttl(adm.rid)
        self.typical_prompt = max(1, (3 * self.typical_prompt + len(adm.prompt_token_ids)) // 4)

    # ---- out of the engine ----------------------------------------------------------------
    def stepped(self, outputs: list[RequestOutput]) -> None:
        """Publish a step's outputs; the finished requests end with their final chunk."""
        batch = Batch(outputs=outputs)
        held = [self.active.get(out.request_id) for out in outputs]
        batch.entries = {adm.rid: adm.entry for adm in held if adm is not None}
        for out in outputs:
            self.generated[out.request_id] = out.generated_length
            if out.finished:
                batch.acks.append(self.forget(out.request_id).entry)
                self.stats.finished += 1
                notify(self.observer, "finished", out.request_id, out.finish_reason.value,
                       out.prompt_length, out.generated_length)  # fmt: skip
        self.publisher.put(batch)

    def forget(self, rid: str) -> Admission:
        """Drop an active request from the books (the engine no longer has it)."""
        self.generated.pop(rid, None)
        return self.active.pop(rid)

    def take_out(self, adm: Admission) -> int:
        """Take a request out of the engine or the backlog; return its generated tokens."""
        generated = self.generated.get(adm.rid, 0)
        if adm.rid in self.active:
            self.engine.abort_request(adm.rid)
            self.forget(adm.rid)
        self.backlog = deque(b for b in self.backlog if b[0].rid != adm.rid)
        self.failures.forget(adm.rid)
        return generated

    def drop(self, entries: Iterable[Entry]) -> None:
        """Stop serving these entries without a word (another worker owns them now)."""
        gone = set(entries)
        for adm in [a for a in self.all() if a.entry in gone]:
            self.take_out(adm)
            self.stats.lost += 1

    def clear(self) -> list[Admission]:
        """Take everything out (handing back); return what was held."""
        held = self.all()
        for adm in self.active.values():
            self.engine.abort_request(adm.rid)
        self.active.clear()
        self.generated.clear()
        self.backlog.clear()
        return held

    # ---- endings --------------------------------------------------------------------------
    def end(self, adm: Admission, reason: Reason) -> None:
        """Stop a request the engine will not finish (cancel, deadline) and tell its client."""
        generated = self.take_out(adm)
        self.publisher.put(outcomes.ended(adm, reason, generated))
        self.stats.count_end(reason)
        notify(self.observer, "finished", adm.rid, reason.value, len(adm.prompt_token_ids),
               generated)  # fmt: skip

    def fail(self, adm: Admission, error: str) -> None:
        """End a request with an error for its client (the deployment was terminated)."""
        generated = self.take_out(adm)
        self.publisher.put(outcomes.failed(adm, error, generated))
        notify(self.observer, "finished", adm.rid, Reason.ERROR.value,
               len(adm.prompt_token_ids), generated, error=error)  # fmt: skip

    def refuse(self, refusal: Refusal, deadletter: bool = False) -> None:
        """An error for the client of an entry that cannot be served (and, for one nobody
        can be told about or that kept breaking workers, the dead-letter stream)."""
        log.warning("refusing entry %s: %s", refusal.entry.entry_id, refusal.error)
        if refusal.rid is not None:
            self.failures.forget(refusal.rid)
            notify(self.observer, "finished", refusal.rid, Reason.ERROR.value, 0, 0,
                   error=refusal.error)  # fmt: skip
        self.publisher.put(outcomes.refused(self.publisher.consumer, refusal, deadletter))
        self.stats.refused += 1
        self.stats.deadlettered += deadletter or refusal.rid is None

    def drop_copy(self, adm: Admission) -> None:
        """Another entry serves this request id (`claims`): ack this one, say nothing."""
        log.warning("dropping entry %s: request %s is served from another entry",
                    adm.entry.entry_id, adm.rid)  # fmt: skip
        self.stats.duplicates += 1
        self.ack(adm.entry)

    def ack(self, entry: Entry) -> None:
        """Acknowledge an entry with nothing to publish (its request already ended)."""
        self.publisher.put(Batch(acks=[entry]))
