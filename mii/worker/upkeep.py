"""A worker's upkeep of the entries it holds, every heartbeat: refresh their idle time,
drop those another worker took over, take over those of dead workers, and on the way out
hand back what is unfinished. Mixed into `WorkerLoop` (it works on the loop's requests)."""

from __future__ import annotations

import time
from collections import deque

from mii.broker_config import wire
from mii.worker import outcomes
from mii.worker.intake import Entry, Refusal, requeue_fields
from mii.worker.publisher import Batch
from mii.worker.registry import DRAINING, READY


class UpkeepMixin:
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.settings.heartbeat_interval_s
        self._sync_clock()
        held = [a.entry for a in self.active.values()] + [a.entry for a, _ in self.backlog]
        for entry in self.leases.heartbeat(held):
            self._drop_lost(entry)
        for rid in self.active:
            self.publisher.refresh_ttl(rid)
        if not self._drain_requested.is_set() and self._capacity():
            self._reclaim()
        self._report(DRAINING if self._drain_requested.is_set() else READY)

    def _drop_lost(self, entry: Entry) -> None:
        """Another worker owns this entry now: stop working on it, publish nothing more."""
        for adm in [a for a in self.active.values() if a.entry == entry]:
            self.engine.abort_request(adm.rid)
            self._forget(adm.rid)
        self.backlog = deque(b for b in self.backlog if b[0].entry != entry)
        self.stats.lost += 1

    def _reclaim(self) -> None:
        for entry, fields in self.leases.reclaim(self.settings.admit_batch):
            self.stats.reclaimed += 1
            if fields is None:  # deleted meanwhile: nothing to serve
                self.publisher.put(Batch(acks=[entry]))
                continue
            parsed = self._parse(entry, fields)
            if entry.deliveries > self.settings.max_deliveries:
                limit, payload = self.settings.max_deliveries, fields.get(wire.PAYLOAD)
                refusal = outcomes.too_many_deliveries(entry, parsed.rid, payload, limit)
                self._refuse(refusal, deadletter=True)
            elif isinstance(parsed, Refusal):
                self._refuse(parsed)
            else:
                self._take([parsed], resume=True)

    def _hand_back(self) -> None:
        """Requeue what this worker still holds, as new entries marked to resume."""
        held = list(self.active.values()) + [adm for adm, _ in self.backlog]
        if not held:
            return
        for adm in self.active.values():
            self.engine.abort_request(adm.rid)
        batch = Batch(acks=[adm.entry for adm in held])
        batch.requeue = [(adm.entry.stream, requeue_fields(adm.message)) for adm in held]
        self.publisher.put(batch)
        self.stats.handed_back += len(held)
        self.active.clear()
        self.backlog.clear()
