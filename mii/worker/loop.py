"""The worker loop: pull what the engine can admit, step the engine, publish the tokens.

`WorkerLoop` owns an engine and talks to one deployment's streams. A plain process hosts
it (`mii.worker.main`); a Celery bootstep can host the same object: call `run()` in the
thread that owns the engine, and `drain()` / `stop()` from any thread.

One iteration: housekeeping when due (heartbeat, reclaim, status), one round trip that
reads the control stream and, if the engine has room, new entries (blocking only while
idle), deadlines, then one engine step whose outputs go to the publisher thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys, process_name
from mii.broker_config.settings import BrokerSettings
from mii.constants import GenerationFinishReason as Reason
from mii.errors import InvalidRequestError
from mii.worker import outcomes
from mii.worker.intake import Admission, Entry, Refusal, parse_entry
from mii.worker.leases import Leases
from mii.worker.observer import RequestObserver, notify
from mii.worker.publisher import Batch, Publisher
from mii.worker.reader import Reader
from mii.worker.registry import DRAINING, FAILED, READY, WorkerRegistry
from mii.worker.stats import LoopStats
from mii.worker.upkeep import UpkeepMixin

log = logging.getLogger(__name__)


class WorkerLoop(UpkeepMixin):
    def __init__(
        self,
        engine,
        redis,
        deployment: str,
        settings: BrokerSettings,
        consumer: str | None = None,
        registry: WorkerRegistry | None = None,
        poll_script: bool = True,
        observer: RequestObserver | None = None,
    ) -> None:
        self.engine, self.redis, self.settings = engine, redis, settings
        self.keys = DeploymentKeys(deployment)
        self.consumer = consumer or process_name()
        self.publisher = Publisher(
            redis, self.keys, self.consumer, settings.response_ttl_s, engine.tokenizer
        )
        self.leases = Leases(redis, self.keys, self.consumer, settings.reclaim_idle_s)
        self.reader = Reader(redis, self.keys, self.consumer, script=poll_script)
        self.registry = registry or WorkerRegistry(redis, self.keys, self.consumer)
        self.active: dict[str, Admission] = {}
        self.generated: dict[str, int] = {}  # request id -> tokens generated so far
        self.backlog: deque[tuple[Admission, list[int]]] = deque()  # read, not yet admitted
        self.stats = LoopStats()
        self.observer = observer or RequestObserver()
        self._paused = threading.Event()
        self._drain_requested = threading.Event()
        self._stop_requested = threading.Event()
        self._clock_offset = 0.0  # Redis clock minus ours, for deadlines
        self._next_housekeeping = 0.0
        self._redis_retry_at = 0.0
        self._backoff = Backoff()
        self._typical_prompt = 16

    # ---- control from other threads --------------------------------------------------
    @property
    def draining(self) -> bool:
        return self._drain_requested.is_set()

    def drain(self) -> None:
        """Stop reading new work; finish in-flight requests (up to `drain_timeout_s`)."""
        self._drain_requested.set()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def pause(self) -> None:
        """Stop reading new work but keep serving what is in flight (remote control)."""
        self._paused.set()

    def resume(self) -> None:
        """Read new work again after `pause`."""
        self._paused.clear()

    def stop(self) -> None:
        """Stop soon: hand in-flight requests back to the queue for other workers."""
        self._drain_requested.set()
        self._stop_requested.set()

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> None:
        """Serve until drained or stopped. An engine failure propagates after publishing
        what was generated; its requests stay pending for other workers to reclaim."""
        self.setup()
        drain_deadline = None
        try:
            while True:
                if self._drain_requested.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.settings.drain_timeout_s
                    self._report(DRAINING)
                if drain_deadline is not None and self._drained(drain_deadline):
                    break
                self.iterate()
        except BaseException as exc:
            self.publisher.stop()
            self._report_failure(exc)
            raise
        self.shutdown()

    def _drained(self, deadline: float) -> bool:
        idle = not self.active and not self.backlog
        return idle or self._stop_requested.is_set() or time.monotonic() >= deadline

    def setup(self) -> None:
        """Create the consumer group, start publishing, announce readiness."""
        for stream in self.keys.request_streams():
            try:
                self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
            except Exception as exc:  # BUSYGROUP: another worker made it first
                if "BUSYGROUP" not in str(exc):
                    raise
        self.reader.start_after_latest_control()
        self._sync_clock()
        self.publisher.start()
        self._report(READY)

    def iterate(self) -> None:
        busy_since = time.perf_counter() if self.engine.has_unfinished_requests() else None
        self._talk_to_redis()
        if busy_since is None and self.engine.has_unfinished_requests():
            busy_since = time.perf_counter()  # idle until this read: not the queue's cost
        self._expire_deadlines()
        if self.engine.has_unfinished_requests():
            self._step()
        elif time.monotonic() < self._redis_retry_at:
            time.sleep(min(0.05, self._redis_retry_at - time.monotonic()))
        if busy_since is not None:
            self.stats.busy_s += time.perf_counter() - busy_since

    def _talk_to_redis(self) -> None:
        """Housekeeping and the poll, unless Redis is down and its retry is not due yet."""
        if time.monotonic() >= self._redis_retry_at:
            try:
                self._housekeeping()
                self._poll()
                self._backoff.reset()
            except CONNECTION_ERRORS as exc:
                delay = self._backoff.next_delay()
                log.warning("Redis unreachable (%s); retrying in %.2fs", exc, delay)
                self._redis_retry_at = time.monotonic() + delay

    def _step(self) -> None:
        started = time.perf_counter()
        outputs = self.engine.step()
        self.stats.step_s += time.perf_counter() - started
        self.stats.steps += 1
        batch = Batch(outputs=outputs)
        for out in outputs:
            self.generated[out.request_id] = out.generated_length
            if out.finished:
                batch.acks.append(self._forget(out.request_id).entry)
                self.stats.finished += 1
                notify(self.observer, "finished", out.request_id, out.finish_reason.value,
                       out.prompt_length, out.generated_length)  # fmt: skip
        self.publisher.put(batch)

    def shutdown(self) -> None:
        """Hand back what is still here, flush the publisher, deregister."""
        self._hand_back()
        self.publisher.flush(timeout_s=30)
        self.publisher.stop()
        try:
            self.registry.remove()
        except CONNECTION_ERRORS:
            log.warning("could not deregister: Redis unreachable")

    # ---- reading ---------------------------------------------------------------------
    def _capacity(self) -> int:
        self._admit_backlog()
        if self._drain_requested.is_set() or self._paused.is_set() or self.backlog:
            return 0
        if not self.engine.can_admit(self._typical_prompt):
            return 0
        return self.settings.admit_batch

    def _poll(self) -> None:
        """One round trip: control messages and, with room, new entries."""
        count = self._capacity()
        idle = count > 0 and not self.active
        control, entries = self.reader.poll(count, self.settings.block_ms if idle else None)
        for fields in control:
            self._apply_control(fields)
        if entries:
            self._intake(entries)

    def _intake(self, entries: list[tuple[Entry, dict]]) -> None:
        parsed = [self._parse(entry, fields) for entry, fields in entries]
        self._take([p for p in parsed if isinstance(p, Admission)], resume=False)
        for refusal in [p for p in parsed if isinstance(p, Refusal)]:
            self._refuse(refusal)

    def _parse(self, entry: Entry, fields: dict) -> Admission | Refusal:
        return parse_entry(entry, fields, self.engine.tokenizer, self.engine.max_model_len)

    def _take(self, admissions: list[Admission], resume: bool) -> None:
        """Queue admissions for the engine, minus cancelled, expired and duplicate ones."""
        cancelled = self.reader.cancelled([a.rid for a in admissions])
        held = {a.rid: a.entry for a in self.active.values()}
        held.update((a.rid, a.entry) for a, _ in self.backlog)
        for adm in admissions:
            self.stats.received += 1
            notify(self.observer, "received", adm.rid, adm.message.prompt, adm.message.params)
            if adm.rid in held:
                self._duplicate(adm, held[adm.rid])
            elif adm.rid in cancelled:
                self._end(adm, Reason.CANCELLED)
            elif self._expired(adm):
                self._end(adm, Reason.TIMEOUT)
            elif resume or adm.message.resume:
                self._resume(adm)
            else:
                self.backlog.append((adm, []))
        self._admit_backlog()

    def _duplicate(self, adm: Admission, held: Entry) -> None:
        """The same request again: our own entry reclaimed after a stall (the claim made it
        ours again, keep going), or a second entry of it (a retried submit): drop that one."""
        if adm.entry.entry_id != held.entry_id:
            self.publisher.put(Batch(acks=[adm.entry]))

    def _resume(self, adm: Admission) -> None:
        published = self.leases.published_tokens(adm.rid)
        if published.final:  # the previous owner finished it but died before the ack
            self.publisher.put(Batch(acks=[adm.entry]))
            return
        self.stats.resumed += 1
        self.backlog.appendleft((adm, published.token_ids))

    def _admit_backlog(self) -> None:
        while self.backlog:
            adm, tokens = self.backlog[0]
            total = len(adm.prompt_token_ids) + len(tokens)
            if self.active and not self.engine.can_admit(total):
                return
            self.backlog.popleft()
            self._add(adm, tokens)

    def _add(self, adm: Admission, tokens: list[int]) -> None:
        try:
            self.engine.add_request(adm.rid, adm.prompt_token_ids, adm.sampling, tokens)
        except InvalidRequestError as exc:
            self._refuse(Refusal(adm.entry, adm.rid, str(exc)))
            return
        self.active[adm.rid] = adm
        self.generated[adm.rid] = len(tokens)
        notify(self.observer, "started", adm.rid)
        self.publisher.refresh_ttl(adm.rid)
        n = len(adm.prompt_token_ids)
        self._typical_prompt = max(1, (3 * self._typical_prompt + n) // 4)

    # ---- ending requests outside the engine --------------------------------------------
    def _forget(self, rid: str) -> Admission:
        self.generated.pop(rid, None)
        return self.active.pop(rid)

    def _end(self, adm: Admission, reason: Reason) -> None:
        """Stop a request the engine will not finish (cancel, deadline) and tell its client."""
        generated = self.generated.get(adm.rid, 0)
        if adm.rid in self.active:
            self.engine.abort_request(adm.rid)
            self._forget(adm.rid)
        self.publisher.put(outcomes.ended(self.consumer, adm, reason, generated))
        self.stats.count_end(reason)
        notify(self.observer, "finished", adm.rid, reason.value, len(adm.prompt_token_ids),
               generated)  # fmt: skip

    def _refuse(self, refusal: Refusal, deadletter: bool = False) -> None:
        log.warning("refusing entry %s: %s", refusal.entry.entry_id, refusal.error)
        self.publisher.put(outcomes.refused(self.consumer, refusal, deadletter))
        self.stats.refused += 1
        if refusal.rid is not None:
            notify(self.observer, "finished", refusal.rid, Reason.ERROR.value, 0, 0,
                   error=refusal.error)  # fmt: skip
        self.stats.deadlettered += deadletter or refusal.rid is None

    def _expired(self, adm: Admission) -> bool:
        deadline = adm.deadline
        return deadline is not None and time.time() + self._clock_offset > deadline

    def _expire_deadlines(self) -> None:
        for adm in [a for a in self.active.values() if self._expired(a)]:
            self._end(adm, Reason.TIMEOUT)
        for adm, tokens in [b for b in self.backlog if self._expired(b[0])]:
            self.backlog.remove((adm, tokens))
            self._end(adm, Reason.TIMEOUT)

    # ---- control messages --------------------------------------------------------------
    def _apply_control(self, fields: dict) -> None:
        try:
            message = wire.decode_control(fields)
        except wire.WireError as exc:
            log.warning("ignoring malformed control entry: %s", exc)
            return
        if message.op == "terminate":
            log.info("deployment terminated: stopping")
            self.stop()
        elif message.rid in self.active:
            self._end(self.active[message.rid], Reason.CANCELLED)
        else:
            for adm, tokens in [b for b in self.backlog if b[0].rid == message.rid]:
                self.backlog.remove((adm, tokens))
                self._end(adm, Reason.CANCELLED)

    def _sync_clock(self) -> None:
        seconds, micros = self.redis.time()
        self._clock_offset = seconds + micros / 1e6 - time.time()

    def _report_failure(self, exc: BaseException) -> None:
        with contextlib.suppress(CONNECTION_ERRORS):
            self.registry.report(FAILED, error=f"{type(exc).__name__}: {exc}")

    def _report(self, state: str) -> None:
        info = self.stats.as_dict()
        info.update(active=len(self.active), backlog=len(self.backlog))
        info.update(tokens_published=self.publisher.tokens_published)
        self.registry.report(state, stats=info, engine=_engine_stats(self.engine))


def _engine_stats(engine) -> dict:
    stats = engine.stats()
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}
