"""A worker's upkeep of the entries it holds, every heartbeat: refresh their idle time,
drop those another worker took over, take over those of dead workers, and on the way out
hand back what is unfinished. Mixed into `WorkerLoop` (it works on the loop's requests)."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque

from mii.broker_config import wire
from mii.broker_config.deployment import is_live, read_workers
from mii.constants import GenerationFinishReason as Reason
from mii.worker import outcomes
from mii.worker.intake import Entry, Refusal, requeue_fields
from mii.worker.publisher import Batch
from mii.worker.registry import DRAINING, READY

log = logging.getLogger(__name__)


def _pid_running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume alive
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


class UpkeepMixin:
    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now < self._next_housekeeping:
            return
        self._next_housekeeping = now + self.settings.heartbeat_interval_s
        self._sync_clock()
        held = [a.entry for a in self._held()] + self.parser.entries()
        for entry in self.leases.heartbeat(held):
            self._drop_lost(entry)
        for rid in self.active:
            self.publisher.refresh_ttl(rid)
        self.claims.refresh(list(self.active))
        self._cancel_abandoned()
        if not self._drain_requested.is_set() and self._capacity():
            self._reclaim_from_dead()
            self._reclaim()
        self._report(DRAINING if self._drain_requested.is_set() else READY)

    def _cancel_abandoned(self) -> None:
        """Cancel the interactive requests of clients that went away (`client_watch`)."""
        watched = [a for a in self._held() if self._interactive(a) and a.message.client]
        gone = self.clients.gone({a.message.client for a in watched})
        for adm in [a for a in watched if a.message.client in gone]:
            log.info("client %s went away: cancelling %s", adm.message.client, adm.rid)
            self.stats.abandoned += 1
            self._end(adm, Reason.CANCELLED)

    def _interactive(self, adm) -> bool:
        return adm.entry.stream == self.keys.requests and adm.message.job is None

    def _reclaim_from_dead(self) -> None:
        """Take over at once what workers known to be dead hold (their status says they
        exited or failed, their heartbeat stopped, or their process is gone from this
        host), instead of waiting `reclaim_idle_s` for their entries to age."""
        statuses = read_workers(self.redis, self.keys)
        dead = {n for n, s in statuses.items() if n != self.consumer and self._is_dead(s)}
        if dead:
            self._take_reclaimed(self.leases.reclaim_from(dead, self.settings.admit_batch))

    def _is_dead(self, status: dict) -> bool:
        if not is_live(status, self.settings.dead_after_s):
            return True
        return status.get("host") == socket.gethostname() and not _pid_running(status.get("pid"))

    def _drop_lost(self, entry: Entry) -> None:
        """Another worker owns this entry now: stop working on it, publish nothing more."""
        for adm in [a for a in self.active.values() if a.entry == entry]:
            self.engine.abort_request(adm.rid)
            self._forget(adm.rid)
        self.backlog = deque(b for b in self.backlog if b[0].entry != entry)
        self.stats.lost += 1

    def _reclaim(self) -> None:
        self._take_reclaimed(self.leases.reclaim(self.settings.admit_batch))

    def _take_reclaimed(self, claimed: list) -> None:
        for entry, fields in claimed:
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
        held = self._held()
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
