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

import redis as redis_py

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.broker_config.deployment import TERMINATING, DeploymentRecord, read_state
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys, process_name
from mii.broker_config.settings import BrokerSettings
from mii.constants import GenerationFinishReason as Reason
from mii.engine.base import Engine
from mii.errors import InvalidRequestError
from mii.worker import outcomes
from mii.worker.claims import Claims
from mii.worker.client_watch import ClientWatch
from mii.worker.fault import StepFailures
from mii.worker.intake import Admission, Entry, Refusal, parse_entry
from mii.worker.leases import Leases, Published
from mii.worker.observer import RequestObserver, notify
from mii.worker.parsing import BackgroundParser, Parsed
from mii.worker.publisher import Batch, Publisher
from mii.worker.reader import Reader
from mii.worker.registry import DRAINING, FAILED, READY, WorkerRegistry
from mii.worker.stats import LoopStats
from mii.worker.upkeep import UpkeepMixin

log = logging.getLogger(__name__)
FRESH_PARSE_WAIT_S = 0.005


class WorkerLoop(UpkeepMixin):
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
        """`record`: the deployment's record, written back if a Redis comes back empty."""
        self.engine, self.redis, self.settings = engine, redis, settings
        self.keys = DeploymentKeys(deployment)
        self.consumer = consumer or process_name()
        self.record = record
        self.publisher = Publisher(
            redis,
            self.keys,
            self.consumer,
            settings.response_ttl_s,
            settings.deadletter_maxlen,
            tokenizer=engine.tokenizer,
        )
        self.leases = Leases(redis, self.keys, self.consumer, settings.reclaim_idle_s)
        self.reader = Reader(redis, self.keys, self.consumer, script=poll_script)
        self.registry = registry or WorkerRegistry(redis, self.keys, self.consumer)
        self.claims = Claims(redis, self.keys, settings.response_ttl_s)
        self.clients = ClientWatch(redis, self.keys, settings.client_timeout_s)
        self.failures = StepFailures(settings.max_deliveries)
        self.parser = BackgroundParser(self._parse)
        self._max_entry_bytes = 4 * settings.prompt_byte_limit(engine.max_model_len)
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
        self._group_missing = False  # a Redis that came back empty: recreate the group

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
            self.parser.close()
            self._report_failure(exc)
            raise
        self.shutdown()

    def _drained(self, deadline: float) -> bool:
        idle = not self.active and not self.backlog and not self.parser.pending
        return idle or self._stop_requested.is_set() or time.monotonic() >= deadline

    def setup(self) -> None:
        """Create the consumer group, start publishing, announce readiness."""
        self._create_groups()
        self.reader.start_after_latest_control()
        self._sync_clock()
        self.publisher.start()
        self._report(READY)
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
        self._expire_deadlines()
        if self.engine.has_unfinished_requests():
            self._step()
        elif time.monotonic() < self._redis_retry_at:
            time.sleep(min(0.05, self._redis_retry_at - time.monotonic()))
        if busy_since is not None:
            self.stats.busy_s += time.perf_counter() - busy_since

    def _talk_to_redis(self) -> None:
        """Housekeeping, the poll and the parsed entries, unless Redis is down and its retry
        is not due yet. A Redis error is waited out; it never ends the worker."""
        if time.monotonic() < self._redis_retry_at:
            return
        try:
            if self._group_missing:
                self._restore()
            self._housekeeping()
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
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 (one request must not end the worker)
            self._recover(exc)
            return
        self.failures.step_succeeded()
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

    def _recover(self, exc: Exception) -> None:
        """A step raised: take its requests out, dead-letter those that used up their
        attempts, and queue the rest to continue from what they published (`fault`)."""
        in_step = list(self.active)
        culprits = self.failures.failed(exc, in_step)  # raises if the engine is broken
        self.stats.step_failures += 1
        log.error("engine step failed (%s: %s); blamed on %s", type(exc).__name__, exc,
                  sorted(culprits), exc_info=exc)  # fmt: skip
        held = [self._forget(rid) for rid in in_step]
        for adm in held:
            self.engine.abort_request(adm.rid)
        self.publisher.flush(timeout_s=30)
        published = self._published([adm.rid for adm in held])
        again = []
        for adm, done in zip(held, published, strict=True):
            if adm.rid in culprits and self.failures.exhausted(adm.rid, adm.entry.deliveries):
                times = self.failures.blamed[adm.rid]
                error = f"the engine failed {times} times while serving this request: {exc}"
                self._refuse(outcomes.step_failure(adm, error), deadletter=True)
            elif done.final:
                self.publisher.put(Batch(acks=[adm.entry]))
            else:
                again.append((adm, done.token_ids))
        self.backlog.extendleft(reversed(again))

    def _published(self, rids: list[str]) -> list:
        """What these requests published; nothing when Redis is down (they then generate
        again from the start, and their clients drop the tokens they already have)."""
        try:
            return self.leases.published_many(rids)
        except (*CONNECTION_ERRORS, redis_py.ResponseError):
            return [Published() for _ in rids]

    def shutdown(self) -> None:
        """Hand back what is still here, flush the publisher, deregister."""
        self._take_all_parsed()
        self._hand_back()
        self.publisher.flush(timeout_s=30)
        self.publisher.stop()
        self.parser.close()
        try:
            self.registry.remove()
        except CONNECTION_ERRORS:
            log.warning("could not deregister: Redis unreachable")

    # ---- reading ---------------------------------------------------------------------
    def _capacity(self) -> int:
        self._admit_backlog()
        if self._drain_requested.is_set() or self._paused.is_set():
            return 0
        if self.backlog or self.parser.pending:
            return 0
        if not self.engine.can_admit(self._typical_prompt):
            return 0
        return self.settings.admit_batch

    def _poll(self) -> int:
        """One round trip: control messages and, with room, new entries (parsed on the
        intake thread, taken in by `_take_parsed`). Returns how many entries came."""
        count = self._capacity()
        idle = count > 0 and not self.active
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
        self._take([p for p in parsed if isinstance(p, Admission)], resume=False, admit=admit)
        for refusal in [p for p in parsed if isinstance(p, Refusal)]:
            self._refuse(refusal)

    def _parse(self, entry: Entry, fields: dict) -> Admission | Refusal:
        tokenizer, max_len = self.engine.tokenizer, self.engine.max_model_len
        return parse_entry(entry, fields, tokenizer, max_len, self._max_entry_bytes)

    def _take(self, admissions: list[Admission], resume: bool, admit: bool = True) -> None:
        """Queue admissions for the engine, minus cancelled, expired and duplicate ones."""
        if not admissions:
            return
        cancelled = self.reader.cancelled([a.rid for a in admissions])
        held = {a.rid: a.entry for a in self.active.values()}
        held.update((a.rid, a.entry) for a, _ in self.backlog)
        fresh = [a for a in admissions if a.rid not in held and a.rid not in cancelled]
        claimed = dict(zip([id(a) for a in fresh], self.claims.take(fresh), strict=True))
        for adm in admissions:
            self.stats.received += 1
            notify(self.observer, "received", adm.rid, adm.message.prompt, adm.message.params)
            if adm.rid in held:
                self._duplicate(adm, held[adm.rid])
            elif adm.rid in cancelled:
                self._end(adm, Reason.CANCELLED)
            elif not claimed[id(adm)]:
                self._drop_copy(adm)
            elif self._expired(adm):
                self._end(adm, Reason.TIMEOUT)
            elif resume or adm.message.resume:
                self._resume(adm)
            else:
                self.backlog.append((adm, []))
        if admit:
            self._admit_backlog()

    def _duplicate(self, adm: Admission, held: Entry) -> None:
        """The same request again: our own entry reclaimed after a stall (the claim made it
        ours again, keep going), or a second entry of it (a retried submit): drop that one."""
        if adm.entry.entry_id != held.entry_id:
            self._drop_copy(adm)

    def _drop_copy(self, adm: Admission) -> None:
        """Another entry serves this request id (`claims`): ack this one, say nothing."""
        log.warning("dropping entry %s: request %s is served from another entry",
                    adm.entry.entry_id, adm.rid)  # fmt: skip
        self.stats.duplicates += 1
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
            if self.failures.admit_one_at_a_time():
                return
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
        except Exception as exc:  # noqa: BLE001 (the engine refused it some other way)
            error = f"the engine could not take this request: {type(exc).__name__}: {exc}"
            self._refuse(Refusal(adm.entry, adm.rid, error, wire.ErrorKind.GENERATION))
            return
        self.failures.note_admitted(adm.rid)
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

    def _take_out(self, adm: Admission) -> int:
        """Take a request out of the engine or the backlog; return its generated tokens."""
        generated = self.generated.get(adm.rid, 0)
        if adm.rid in self.active:
            self.engine.abort_request(adm.rid)
            self._forget(adm.rid)
        self.backlog = deque(b for b in self.backlog if b[0].rid != adm.rid)
        self.failures.forget(adm.rid)
        return generated

    def _end(self, adm: Admission, reason: Reason) -> None:
        """Stop a request the engine will not finish (cancel, deadline) and tell its client."""
        generated = self._take_out(adm)
        self.publisher.put(outcomes.ended(self.consumer, adm, reason, generated))
        self.stats.count_end(reason)
        notify(self.observer, "finished", adm.rid, reason.value, len(adm.prompt_token_ids),
               generated)  # fmt: skip

    def _fail(self, adm: Admission, error: str) -> None:
        """End a request with an error for its client (the deployment was terminated)."""
        generated = self._take_out(adm)
        self.publisher.put(outcomes.failed(self.consumer, adm, error, generated))
        notify(self.observer, "finished", adm.rid, Reason.ERROR.value,
               len(adm.prompt_token_ids), generated, error=error)  # fmt: skip

    def _refuse(self, refusal: Refusal, deadletter: bool = False) -> None:
        log.warning("refusing entry %s: %s", refusal.entry.entry_id, refusal.error)
        if refusal.rid is not None:
            self.failures.forget(refusal.rid)
        self.publisher.put(outcomes.refused(self.consumer, refusal, deadletter))
        self.stats.refused += 1
        if refusal.rid is not None:
            notify(self.observer, "finished", refusal.rid, Reason.ERROR.value, 0, 0,
                   error=refusal.error)  # fmt: skip
        self.stats.deadlettered += deadletter or refusal.rid is None

    def _expired(self, adm: Admission) -> bool:
        deadline = adm.deadline
        return deadline is not None and time.time() + self._clock_offset > deadline

    def _held(self) -> list[Admission]:
        """Every request this worker serves or has queued for its engine."""
        return [*self.active.values(), *(adm for adm, _ in self.backlog)]

    def _expire_deadlines(self) -> None:
        for adm in [a for a in self._held() if self._expired(a)]:
            self._end(adm, Reason.TIMEOUT)

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
        for adm in [a for a in self._held() if a.rid == message.rid]:
            self._end(adm, Reason.CANCELLED)

    def _terminate(self) -> None:
        """The deployment is being terminated: every request here ends with an error for
        its client (nothing is handed back to a deployment that is going away), then stop."""
        log.info("deployment terminated: ending %d requests and stopping", len(self._held()))
        self._take_all_parsed(timeout_s=5.0)
        for adm in self._held():
            self._fail(adm, "the deployment was terminated")
        self.stop()

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
