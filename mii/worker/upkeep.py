"""A worker's upkeep of the entries it holds, every heartbeat: refresh their idle time and
their claims, drop those another worker took over, cancel those whose client went away,
take over those of dead workers, report the worker's status; and on the way out, hand
back what is unfinished. `Upkeep` works through its host's public parts (`UpkeepHost`,
which `WorkerLoop` is)."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Protocol

from mii.broker_config import wire
from mii.broker_config.deployment import DRAINING, READY, is_live, read_workers
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings
from mii.constants import GenerationFinishReason as Reason
from mii.worker import outcomes
from mii.worker.claims import Claims
from mii.worker.client_watch import ClientWatch
from mii.worker.held import HeldRequests
from mii.worker.intake import Admission, Entry, Refusal, requeue_fields
from mii.worker.outcomes import Batch
from mii.worker.parsing import BackgroundParser, Parsed
from mii.worker.stats import LoopStats
from mii.worker.streams import Leases

log = logging.getLogger(__name__)


class UpkeepHost(Protocol):
    """What upkeep needs of the worker loop it keeps."""

    redis: object
    keys: DeploymentKeys
    consumer: str
    settings: BrokerSettings
    held: HeldRequests
    parser: BackgroundParser
    leases: Leases
    stats: LoopStats

    @property
    def draining(self) -> bool: ...

    def capacity(self) -> int: ...

    def sync_clock(self) -> None: ...

    def parse(self, entry: Entry, fields: dict) -> Parsed: ...

    def take(self, admissions: list[Admission], resume: bool) -> None: ...

    def report(self, state: str) -> None: ...


class Upkeep:
    def __init__(self, host: UpkeepHost) -> None:
        self.host = host
        self.claims = Claims(host.redis, host.keys, host.settings.response_ttl_s)
        self.clients = ClientWatch(host.redis, host.keys, host.settings.client_timeout_s)
        self._due = 0.0

    def maybe_run(self) -> None:
        """One round of upkeep, when a heartbeat interval has passed since the last."""
        now = time.monotonic()
        if now < self._due:
            return
        host = self.host
        self._due = now + host.settings.heartbeat_interval_s
        host.sync_clock()
        held = [a.entry for a in host.held.all()] + host.parser.entries()
        host.held.drop(host.leases.heartbeat(held))
        for rid in host.held.active:
            host.held.publisher.refresh_ttl(rid)
        self.claims.refresh(list(host.held.active))
        self._cancel_abandoned()
        if not host.draining and host.capacity():
            self._take_over(
                host.leases.reclaim_from(self._dead_workers(), host.settings.admit_batch)
            )
            self._take_over(host.leases.reclaim(host.settings.admit_batch))
        host.report(DRAINING if host.draining else READY)

    def _cancel_abandoned(self) -> None:
        """Cancel the interactive requests of clients that went away (`client_watch`)."""
        watched = [a for a in self.host.held.all() if self._interactive(a) and a.message.client]
        gone = self.clients.gone({a.message.client for a in watched})
        for adm in [a for a in watched if a.message.client in gone]:
            log.info("client %s went away: cancelling %s", adm.message.client, adm.rid)
            self.host.stats.abandoned += 1
            self.host.held.end(adm, Reason.CANCELLED)

    def _interactive(self, adm: Admission) -> bool:
        return adm.entry.stream in self.host.keys.request_partitions and adm.message.job is None

    def _dead_workers(self) -> set[str]:
        """Workers known to be dead: their status says they exited or failed, their
        heartbeat stopped, or their process is gone from this host. What they hold is
        taken over at once, instead of after `reclaim_idle_s`."""
        host = self.host
        statuses = read_workers(host.redis, host.keys).items()
        return {name for name, s in statuses if name != host.consumer and self._is_dead(s)}

    def _is_dead(self, status: dict) -> bool:
        if not is_live(status, self.host.settings.dead_after_s):
            return True
        return status.get("host") == socket.gethostname() and not _pid_running(status.get("pid"))

    def _take_over(self, claimed: list[tuple[Entry, dict | None]]) -> None:
        host = self.host
        for entry, fields in claimed:
            host.stats.reclaimed += 1
            if fields is None:  # deleted meanwhile: nothing to serve
                host.held.ack(entry)
                continue
            parsed = host.parse(entry, fields)
            if entry.deliveries > host.settings.max_deliveries:
                limit, payload = host.settings.max_deliveries, fields.get(wire.PAYLOAD)
                refusal = outcomes.too_many_deliveries(entry, parsed.rid, payload, limit)
                host.held.refuse(refusal, deadletter=True)
            elif isinstance(parsed, Refusal):
                host.held.refuse(parsed)
            else:
                host.take([parsed], resume=True)

    def hand_back(self) -> None:
        """Requeue what the worker still holds, as new entries marked to resume."""
        held = self.host.held.clear()
        if not held:
            return
        batch = Batch(acks=[adm.entry for adm in held])
        batch.requeue = [(adm.entry.stream, requeue_fields(adm)) for adm in held]
        self.host.held.publisher.put(batch)
        self.host.stats.handed_back += len(held)


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
