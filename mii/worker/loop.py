"""The worker loop: pull what the engine can admit, step the engine, publish the tokens.

`WorkerLoop` owns an engine and talks to one deployment's streams. Its host (the Celery
bootstep, `mii.worker.celery.bootstep`) calls `run()` in the thread that owns the engine,
and `drain()` / `stop()` / `pause()` from any thread.

One iteration: upkeep when due (heartbeat, takeovers, status), one round trip that reads
the control stream and, if the engine has room, new entries (blocking only while idle),
the entries the intake thread has parsed, deadlines, then one engine step whose outputs go
to the publisher thread. Who holds what, and how each request ends: `held`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time

import redis as redis_py

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.broker_config.deployment import (
    DRAINING,
    FAILED,
    READY,
    TERMINATING,
    DeploymentRecord,
    WorkerRegistry,
    read_state,
)
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys, process_name
from mii.broker_config.replay import Replayed
from mii.broker_config.settings import BrokerSettings
from mii.constants import GenerationFinishReason as Reason
from mii.engine.base import Engine
from mii.worker import outcomes
from mii.worker.fault import StepFailures
from mii.worker.held import HeldRequests
from mii.worker.intake import Admission, Entry, Refusal, parse_entry
from mii.worker.observer import RequestObserver, notify
from mii.worker.parsing import BackgroundParser, Parsed
from mii.worker.publisher import Publisher
from mii.worker.stats import LoopStats
from mii.worker.streams import Leases, Reader
from mii.worker.upkeep import Upkeep
from mii.worker.watchdog import StepWatchdog

log = logging.getLogger(__name__)
FRESH_PARSE_WAIT_S = 0.005


class WorkerLoop:
    def __init__(
        self,
        engine: Engine,
        redis,
        deployment: str,
        settings: BrokerSettings,
        consumer: str | None = None,
        registry: WorkerRegistry | None = None,
        poll_script: bool = True,
        observer: RequestObserver | None = None,
        record: DeploymentRecord | None = None,
    ) -> None:
        """`record`: the deployment's record, written back if a Redis comes back empty;
        `poll_script=False` reads with plain commands (for fakeredis, see `streams`)."""
        self.engine, self.redis, self.settings = engine, redis, settings
        self.keys = DeploymentKeys(deployment, settings.partitions)
        self.consumer = consumer or process_name()
        self.record = record
        self.publisher = Publisher(
            redis, self.keys, self.consumer, settings.response_ttl_s,
            settings.deadletter_maxlen, tokenizer=engine.tokenizer,
            reply_maxlen=settings.reply_maxlen,
            publish_interval_s=settings.publish_interval_ms / 1000,
        )  # fmt: skip
        self.leases = Leases(redis, self.keys, self.consumer, settings.reclaim_idle_s)
        self.reader = Reader(redis, self.keys, self.consumer, script=poll_script)
        self.registry = registry or WorkerRegistry(redis, self.keys, self.consumer)
        self.stats = LoopStats()
        self.observer = observer or RequestObserver()
        self.failures = StepFailures(settings.max_deliveries)
        self.held = HeldRequests(engine, self.publisher, self.failures, self.stats, self.observer)
        self.parser = BackgroundParser(self.parse)
        self.upkeep = Upkeep(self)
        self.watchdog = StepWatchdog(settings.step_timeout_s, self._report_stuck)
        self._max_entry_bytes = 4 * settings.prompt_byte_limit(engine.max_model_len)
        self._paused = threading.Event()
        self._drain_requested = threading.Event()
        self._stop_requested = threading.Event()
        self._clock_offset = 0.0  # Redis clock minus ours, for deadlines
        self._redis_retry_at = 0.0
        self._backoff = Backoff()
        self._group_missing = False  # a Redis that came back empty: recreate the group

    @property
    def active(self) -> dict[str, Admission]:
        """The requests in the engine, by id."""
        return self.held.active

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
        """Serve until drained or stopped. A broken engine (`fault.EngineBroken`)
        propagates; its requests stay pending for other workers to take over."""
        self.setup()
        drain_deadline = None
        try:
            while True:
                if self.draining and drain_deadline is None:
                    drain_deadline = time.monotonic() + self.settings.drain_timeout_s
                    self.report(DRAINING)
                if drain_deadline is not None and self._drained(drain_deadline):
                    break
                self.iterate()
        except BaseException as exc:
            self.watchdog.stop()
            self.publisher.stop()
            self.parser.close()
            self._report_failure(exc)
            raise
        self.shutdown()

    def _drained(self, deadline: float) -> bool:
        idle = not self.held and not self.parser.pending
        return idle or self._stop_requested.is_set() or time.monotonic() >= deadline

    def setup(self) -> None:
        """Create the consumer group, start publishing, announce readiness."""
        self._create_groups()
        self.reader.start_after_latest_control()
        self.sync_clock()
        self.publisher.start()
        self.watchdog.start()
        self.report(READY)
        if read_state(self.redis, self.keys).get("state") == TERMINATING:
            log.info("the deployment is being terminated: not serving")
            self.stop()  # its terminate message came before this worker started reading

    def _create_groups(self) -> None:
        for stream in self.keys.request_streams():
            try:
                self.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
            except redis_py.ResponseError as exc:  # BUSYGROUP: another worker made it first
                if "BUSYGROUP" not in str(exc):
                    raise

    def _restore(self) -> None:
        """After a Redis came back empty (no persistence, FLUSHALL, a failover to a replica
        that lacks the data): recreate the group and the deployment's record, and go on.
        Requests this worker holds keep running; their entries are gone with the rest."""
        log.warning("the deployment's consumer group is gone (Redis emptied?): recreating it")
        self._create_groups()
        if self.record is not None:
            self.redis.set(self.keys.config, self.record.model_dump_json(), nx=True)
        self._group_missing = False

    def iterate(self) -> None:
        busy_since = time.perf_counter() if self.engine.has_unfinished_requests() else None
        self._talk_to_redis()
        if busy_since is None and self.engine.has_unfinished_requests():
            busy_since = time.perf_counter()  # idle until this read: not the queue's cost
        for adm in [a for a in self.held.all() if self._expired(a)]:
            self.held.end(adm, Reason.TIMEOUT)
        if self.engine.has_unfinished_requests():
            self._step()
        elif time.monotonic() < self._redis_retry_at:
            time.sleep(min(0.05, self._redis_retry_at - time.monotonic()))
        if busy_since is not None:
            self.stats.busy_s += time.perf_counter() - busy_since

    def _talk_to_redis(self) -> None:
        """Upkeep, the poll and the parsed entries, unless Redis is down and its retry is
        not due yet. A Redis error is waited out; it never ends the worker."""
        if time.monotonic() < self._redis_retry_at:
            return
        try:
            if self._group_missing:
                self._restore()
            self.upkeep.maybe_run()
            self._take_parsed(self._poll())
            self._backoff.reset()
        except CONNECTION_ERRORS as exc:
            self._retry_later(f"Redis unreachable ({exc})")
        except redis_py.ResponseError as exc:
            self._group_missing = str(exc).startswith("NOGROUP")
            self._retry_later(f"Redis refused a command ({exc})")

    def _retry_later(self, why: str) -> None:
        delay = self._backoff.next_delay()
        log.warning("%s; retrying in %.2fs", why, delay)
        self._redis_retry_at = time.monotonic() + delay

    def _step(self) -> None:
        started = time.perf_counter()
        try:
            with self.watchdog.stepping():
                outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 (one request must not end the worker)
            self._recover(exc)
            return
        self.failures.step_succeeded()
        self.stats.step_s += time.perf_counter() - started
        self.stats.steps += 1
        self.held.stepped(outputs)

    def _recover(self, exc: Exception) -> None:
        """A step raised: take its requests out, dead-letter those that used up their
        attempts, and queue the rest to continue from what they published (`fault`)."""
        in_step = list(self.held.active)
        culprits = self.failures.failed(exc, in_step)  # raises if the engine is broken
        self.stats.step_failures += 1
        log.error("engine step failed (%s: %s); blamed on %s", type(exc).__name__, exc,
                  sorted(culprits), exc_info=exc)  # fmt: skip
        taken = [self.held.forget(rid) for rid in in_step]
        for adm in taken:
            self.engine.abort_request(adm.rid)
        self.publisher.flush(timeout_s=30)
        for adm, done in reversed(list(zip(taken, self._published(taken), strict=True))):
            if adm.rid in culprits and self.failures.exhausted(adm.rid, adm.entry.deliveries):
                times = self.failures.blamed[adm.rid]
                error = f"the engine failed {times} times while serving this request: {exc}"
                self.held.refuse(outcomes.step_failure(adm, error), deadletter=True)
            elif done.final:
                self.held.ack(adm.entry)
            else:
                self.held.queue(adm, done.token_ids, first=True)

    def _published(self, taken: list[Admission]) -> list[Replayed]:
        """What these requests published; nothing when Redis is down (they then generate
        again from the start, and their clients drop the tokens they already have)."""
        try:
            return self.leases.published(taken)
        except (*CONNECTION_ERRORS, redis_py.ResponseError):
            return [Replayed() for _ in taken]

    def shutdown(self) -> None:
        """Hand back what is still here, flush the publisher, deregister."""
        self.watchdog.stop()
        self._take_all_parsed()
        self.upkeep.hand_back()
        self.publisher.flush(timeout_s=30)
        self.publisher.stop()
        self.parser.close()
        try:
            self.registry.remove()
        except CONNECTION_ERRORS:
            log.warning("could not deregister: Redis unreachable")

    # ---- reading ---------------------------------------------------------------------
    def capacity(self) -> int:
        """How many new entries to read now (0 while paused, draining or full)."""
        self.held.admit()
        if self.draining or self.paused or self.held.backlog or self.parser.pending:
            return 0
        if not self.engine.can_admit(self.held.typical_prompt):
            return 0
        return self.settings.admit_batch

    def _poll(self) -> int:
        """One round trip: control messages and, with room, new entries (parsed on the
        intake thread, taken in by `_take_parsed`). Returns how many entries came."""
        count = self.capacity()
        idle = count > 0 and not self.held.active
        control, entries = self.reader.poll(count, self.settings.block_ms if idle else None)
        for fields in control:
            self._apply_control(fields)
        self.parser.submit(entries)
        return len(entries)

    def _take_parsed(self, fresh: int) -> None:
        """Take in what the intake thread parsed. An idle worker waits a little for it; a
        busy one gives entries that just came a moment (ordinary prompts parse in well
        under a millisecond), and takes a long one in at a later step."""
        idle = not self.engine.has_unfinished_requests()
        wait_s = self.settings.block_ms / 1000 if idle else (FRESH_PARSE_WAIT_S if fresh else 0)
        self._intake(self.parser.ready(wait_s=wait_s))

    def _take_all_parsed(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.parser.pending and time.monotonic() < deadline:
            self._intake(self.parser.ready(wait_s=0.1), admit=False)

    def _intake(self, parsed: list[Parsed], admit: bool = True) -> None:
        self.take([p for p in parsed if isinstance(p, Admission)], resume=False, admit=admit)
        for refusal in [p for p in parsed if isinstance(p, Refusal)]:
            self.held.refuse(refusal)

    def parse(self, entry: Entry, fields: dict) -> Parsed:
        tokenizer, max_len = self.engine.tokenizer, self.engine.max_model_len
        return parse_entry(entry, fields, tokenizer, max_len, self._max_entry_bytes)

    def take(self, admissions: list[Admission], resume: bool, admit: bool = True) -> None:
        """Queue admissions for the engine, minus cancelled, expired and duplicate ones;
        `resume`: taken over from another worker (continue what it published)."""
        if not admissions:
            return
        cancelled = self.reader.cancelled([a.rid for a in admissions])
        held = {a.rid: a.entry for a in self.held.all()}
        fresh = [a for a in admissions if a.rid not in held and a.rid not in cancelled]
        claimed = dict(zip(map(id, fresh), self.upkeep.claims.take(fresh), strict=True))
        for adm in admissions:
            self.stats.received += 1
            notify(self.observer, "received", adm.rid, adm.message.prompt, adm.message.params)
            if adm.rid in held:
                if adm.entry.entry_id != held[adm.rid].entry_id:
                    self.held.drop_copy(adm)  # else our own entry, reclaimed after a stall
            elif adm.rid in cancelled:
                self.held.end(adm, Reason.CANCELLED)
            elif not claimed[id(adm)]:
                self.held.drop_copy(adm)
            elif self._expired(adm):
                self.held.end(adm, Reason.TIMEOUT)
            elif resume or adm.message.resume:
                self._resume(adm)
            else:
                self.held.queue(adm, [])
        if admit:
            self.held.admit()

    def _resume(self, adm: Admission) -> None:
        (published,) = self.leases.published([adm])
        if published.final:  # the previous owner finished it but died before the ack
            self.held.ack(adm.entry)
            return
        self.stats.resumed += 1
        self.held.queue(adm, published.token_ids, first=True)

    def _expired(self, adm: Admission) -> bool:
        deadline = adm.deadline
        return deadline is not None and time.time() + self._clock_offset > deadline

    # ---- control messages --------------------------------------------------------------
    def _apply_control(self, fields: dict) -> None:
        try:
            message = wire.decode_control(fields)
        except wire.WireError as exc:
            log.warning("ignoring malformed control entry: %s", exc)
            return
        if message.op == "terminate":
            self._terminate()
            return
        for adm in [a for a in self.held.all() if a.rid == message.rid]:
            self.held.end(adm, Reason.CANCELLED)

    def _terminate(self) -> None:
        """The deployment is being terminated: every request here ends with an error for
        its client (nothing is handed back to a deployment that is going away), then stop."""
        log.info("deployment terminated: ending %d requests and stopping", len(self.held))
        self._take_all_parsed(timeout_s=5.0)
        for adm in self.held.all():
            self.held.fail(adm, "the deployment was terminated")
        self.stop()

    # ---- status ------------------------------------------------------------------------
    def sync_clock(self) -> None:
        seconds, micros = self.redis.time()
        self._clock_offset = seconds + micros / 1e6 - time.time()

    def _report_failure(self, exc: BaseException) -> None:
        self._report_failed(f"{type(exc).__name__}: {exc}")

    def _report_stuck(self, elapsed: float) -> None:
        """The watchdog's last word before it ends the process (`watchdog`)."""
        self._report_failed(f"engine step stuck for {elapsed:.0f}s")

    def _report_failed(self, error: str) -> None:
        with contextlib.suppress(CONNECTION_ERRORS):
            self.registry.report(FAILED, error=error)

    def report(self, state: str) -> None:
        """This worker's status, statistics and engine counters, in the workers hash."""
        info = self.stats.as_dict()
        info.update(active=len(self.held.active), backlog=len(self.held.backlog))
        info.update(tokens_published=self.publisher.tokens_published)
        self.registry.report(state, stats=info, engine=_engine_stats(self.engine))


def _engine_stats(engine: Engine) -> dict:
    stats = engine.stats()
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else {}
