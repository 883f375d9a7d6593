"""The token publisher: a thread that writes each engine step's chunks to Redis.

The engine thread only enqueues a step's outputs; this thread packs them and sends one
MULTI/EXEC pipeline per step (or per several steps, when it fell behind), so publishing
overlaps the next forward pass. A final chunk, its XACK and the XDEL of the request entry
travel in the same transaction: an entry is never acknowledged before its client can see
the end. For a line of a bulk job, the line's result is recorded in the job there too
(`bulk_results`). Lost connections are retried with backoff, in order, until they succeed.

On a Redis Cluster with several partitions a step's commands span several slots: they go
as one transaction per slot, the slots without acks first (dead letters, job records),
then each partition's chunks with the acks of its entries. A request's entry, final chunk
and reply stream share its partition's slot, so it is still never acknowledged before its
client can see the end; what goes in separate transactions is acknowledged after it is
published, and a worker that dies in between leaves the entry to be taken over and ended
again (the client takes each token index once).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass

import redis

from mii.broker_config import wire
from mii.broker_config.connection import retry_until
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys, by_slot
from mii.engine.outputs import RequestOutput
from mii.worker.bulk_results import JobRecorder
from mii.worker.intake import Entry
from mii.worker.outcomes import Batch, Ending

log = logging.getLogger(__name__)

COALESCE_FROM = 32
"""A step of this many requests' outputs or more opens a publishing interval: the steps
that end within it go out together (`BrokerSettings.publish_interval_ms`)."""


class Publisher:
    def __init__(
        self,
        redis,
        keys: DeploymentKeys,
        consumer: str,
        ttl_s: int,
        deadletter_maxlen=10_000,
        tokenizer=None,
        reply_maxlen=10_000,
        publish_interval_s: float = 0.0,
    ) -> None:
        """`tokenizer` (the engine's, if it has one) gives logprob chunks their token texts.
        `publish_interval_s`: see `COALESCE_FROM`."""
        self.redis, self.keys, self.consumer, self.ttl_s = redis, keys, consumer, ttl_s
        self.deadletter_maxlen, self.reply_maxlen = deadletter_maxlen, reply_maxlen
        self.publish_interval_s = publish_interval_s
        self._last_send = 0.0
        self._reply_expiry: dict[str, float] = {}  # reply stream -> when to refresh its TTL
        self.tokenizer = tokenizer
        self._queue: queue.Queue[Batch | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="mii-publisher", daemon=True)
        self._fresh: set[str] = set()  # response streams this worker has not written yet
        self.jobs = JobRecorder(redis, keys, consumer, tokenizer)
        self.tokens_published = 0
        self.chunks_published = 0
        self.transactions = 0
        self.failed_attempts = 0
        self.command_errors = 0

    def start(self) -> None:
        self._thread.start()

    def put(self, batch: Batch) -> None:
        if batch:
            self._queue.put(batch)

    def refresh_ttl(self, request_id: str) -> None:
        """The next write to this request's stream also (re)sets its TTL: called when it is
        admitted, and now and then for long generations."""
        self._fresh.add(request_id)

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until everything enqueued so far is written; False on timeout."""
        done = threading.Event()
        self._queue.put(_Marker(done))
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout_s)

    @property
    def backlog(self) -> int:
        return self._queue.qsize()

    # ---- the thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            items, merge = self._within_interval([self._queue.get()])
            batches, stop = self._take_more(items)
            try:
                self._write(batches, merge)
            except Exception:  # noqa: BLE001 (a bad batch must not stop the publishing)
                self.command_errors += 1
                log.exception("could not publish a batch; dropped")
            if stop:
                return

    def _within_interval(self, items: list) -> tuple[list, bool]:
        """With a big step first, also the steps that end before the interval since the
        last send is over (a flush or stop ends the wait); and whether to merge them."""
        first = items[0]
        big = isinstance(first, Batch) and len(first.outputs) >= COALESCE_FROM
        if not (big and self.publish_interval_s > 0):
            return items, False
        deadline = self._last_send + self.publish_interval_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                items.append(self._queue.get(timeout=left))
            except queue.Empty:
                break
            if not isinstance(items[-1], Batch):
                break
        return items, True

    def _take_more(self, items: list) -> tuple[list[Batch], bool]:
        """Everything queued right now, so one transaction catches up after a slow one."""
        while len(items) < 64:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                break
        stop = any(item is None for item in items)
        return [i for i in items if i is not None], stop

    def _write(self, items: list, merge: bool = False) -> None:
        batches = [i for i in items if isinstance(i, Batch)]
        try:
            if batches:
                self._send(batches, merge)
        finally:
            for marker in [i for i in items if isinstance(i, _Marker)]:
                marker.done.set()

    def _send(self, batches: list[Batch], merge: bool = False) -> None:
        """One transaction (per slot) for the batches; with `merge`, a request's chunks of
        consecutive steps become one chunk of its reply stream's entry, else each batch
        writes its own entries, as its step ended."""
        commands: list[tuple] = []
        replies: dict[str, list[dict[str, dict]]] = {}  # reply stream -> entries' chunks
        tokens = 0
        for batch in batches:
            tokens += self._add_batch(commands, replies, batch)
            if not merge:
                self._xadd_replies(commands, replies)
        self._xadd_replies(commands, replies)
        commands += self.jobs.commands(batches)
        self._last_send = time.monotonic()
        groups = [commands] if self.keys.partitions == 1 else _by_slot(commands)  # one slot
        for group in groups:
            try:
                retry_until(lambda g=group: self._execute(g), None,
                            on_retry=self._failed_attempt)  # fmt: skip
            except redis.ResponseError as exc:
                # EXEC ran every other command (e.g. an XACK into a consumer group that a
                # Redis which came back empty no longer has): nothing to send again.
                self.command_errors += 1
                log.warning("a published command failed: %s", exc)
            self.transactions += 1
        self.tokens_published += tokens

    def _execute(self, commands: list[tuple]) -> None:
        pipe = self.redis.pipeline(transaction=True)
        for name, *args in commands:
            getattr(pipe, name)(*args)
        pipe.execute()

    def _failed_attempt(self, exc: BaseException) -> None:
        self.failed_attempts += 1
        log.warning("publishing failed (%s); retrying", exc)

    def _add_batch(self, commands: list[tuple], replies: dict, batch: Batch) -> int:
        """Append the batch's commands, and its reply-stream chunks to `replies` (merged
        with a request's chunk of an earlier batch); return how many tokens they publish."""
        tokens = 0
        for out in batch.outputs:
            fields = _chunk(out, self.consumer, self.tokenizer)
            self._route(commands, replies, batch.entries.get(out.request_id), out.request_id,
                        fields, out.finished)  # fmt: skip
            tokens += len(out.token_ids)
        for ending in batch.endings:
            fields = _ending_fields(ending, self.consumer)
            self._route(commands, replies, ending.entry, ending.rid, fields, True)
        for fields in batch.deadletters:
            maxlen = self.deadletter_maxlen  # exact: dead letters are rare
            commands.append(("xadd", self.keys.deadletter, fields, "*", maxlen, False))
        for stream, fields in batch.requeue:
            commands.append(("xadd", stream, fields))
        for entry in batch.acks:
            commands.append(("xack", entry.stream, WORKER_GROUP, entry.entry_id))
            commands.append(("xdel", entry.stream, entry.entry_id))
        return tokens

    def _route(self, commands, replies, entry: Entry | None, rid: str, fields, final) -> None:
        """A bulk line's chunk goes nowhere (its result goes into its job); a chunk of a
        request with a reply stream joins that stream's entry; any other, its own stream."""
        if entry is not None and entry.job is not None:
            return
        if entry is not None and entry.reply is not None:
            entries = replies.setdefault(entry.reply, [{}])
            earlier = entries[-1].get(rid)
            if earlier is None:
                entries[-1][rid] = fields
            elif _follows(earlier, fields):
                entries[-1][rid] = _merged(earlier, fields)
            else:  # not the next tokens (a resumed request): an entry of its own
                entries.append({rid: fields})
            return
        self._xadd(commands, rid, wire.pack(fields), final)

    def _xadd(self, commands: list[tuple], rid: str, payload: bytes, final: bool) -> None:
        key = self.keys.response(rid)
        commands.append(("xadd", key, {wire.PAYLOAD: payload}))
        self.chunks_published += 1
        if final or rid in self._fresh:
            self._fresh.discard(rid)
            commands.append(("expire", key, self.ttl_s))

    def _xadd_replies(self, commands: list[tuple], replies: dict) -> None:
        """The reply entries gathered so far, in order; `replies` is emptied."""
        for name, entries in replies.items():
            for chunks in entries:
                self._xadd_reply(commands, name, chunks)
        replies.clear()

    def _xadd_reply(self, commands: list[tuple], name: str, chunks: dict[str, dict]) -> None:
        """One entry for a step's chunks of every request of a reply stream; its TTL is
        set when this worker first writes it and refreshed now and then after."""
        key = self.keys.replies(name)
        commands.append(("xadd", key, {wire.PAYLOAD: wire.reply_payload(chunks)}, "*",
                         self.reply_maxlen, True))  # fmt: skip
        self.chunks_published += len(chunks)
        now = time.monotonic()
        if self._reply_expiry.get(name, 0.0) <= now:
            self._reply_expiry[name] = now + self.ttl_s / 4
            commands.append(("expire", key, self.ttl_s))


def _by_slot(commands: list[tuple]) -> list[list[tuple]]:
    """The commands grouped by their key's slot, in order; groups with acks last."""
    groups = by_slot(commands, lambda c: c[3] if c[0] == "eval" else c[1])
    return sorted(groups, key=lambda g: any(c[0] == "xack" for c in g))


_LISTS = ("ids", "lp", "toks", "top")


def _follows(earlier: dict, later: dict) -> bool:
    """Whether `later` starts at the token after `earlier`'s last."""
    return later["i"] == earlier["i"] + len(earlier.get("ids") or ())


def _merged(earlier: dict, later: dict) -> dict:
    """One chunk for a request's two consecutive chunks: the tokens (and their logprobs and
    texts) of both, from the earlier one's index on; the later one's lengths and ending."""
    merged = dict(
        later, i=earlier["i"], text=(earlier.get("text") or "") + (later.get("text") or "")
    )
    for name in _LISTS:
        if earlier.get(name) is not None or later.get(name) is not None:
            merged[name] = list(earlier.get(name) or []) + list(later.get(name) or [])
    merged["v"] = max(earlier["v"], later["v"])
    return merged


@dataclass
class _Marker:
    done: threading.Event


def _chunk(out: RequestOutput, consumer: str, tokenizer=None) -> dict:
    fields = dict(i=out.first_token_index, ids=list(out.token_ids), text=out.text)
    fields.update(plen=out.prompt_length, glen=out.generated_length)
    if out.logprobs is not None:
        fields.update(_logprob_fields(out.logprobs, tokenizer))
    if out.finished:
        fields.update(reason=out.finish_reason, worker=consumer)
    if out.error is not None:
        fields.update(error=out.error, etype=wire.ErrorKind.GENERATION)
    return wire.chunk_fields(**fields)


def _logprob_fields(logprobs, tokenizer) -> dict:
    """`lp`; with a tokenizer also `toks` and, when alternatives were asked for, `top`.
    Decoded here, in the publisher's thread, off the engine's critical path."""
    fields: dict = {"lp": [lp.logprob for lp in logprobs]}
    if tokenizer is None:
        return fields
    fields["toks"] = [_token_text(tokenizer, lp.token_id) for lp in logprobs]
    if any(lp.top for lp in logprobs):
        fields["top"] = [[(t, v, _token_text(tokenizer, t)) for t, v in lp.top] for lp in logprobs]
    return fields


def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _ending_fields(ending: Ending, consumer: str) -> dict:
    """The final chunk of a request ended outside the engine (cancel, deadline, refusal)."""
    fields = dict(i=ending.glen, plen=ending.plen, glen=ending.glen, reason=ending.reason,
                  worker=consumer)  # fmt: skip
    if ending.error is not None:
        fields.update(error=ending.error, etype=ending.etype or wire.ErrorKind.GENERATION)
    return wire.chunk_fields(**fields)
