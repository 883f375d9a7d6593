"""Recording bulk job lines' results, in the publisher's transaction.

A request that is a line of a bulk job (its entry carries a `JobLine`) gets its result
written into the job (`mii.broker_config.jobs.RECORD_SCRIPT`) in the same MULTI/EXEC that
publishes its final chunk and acks its entry; its response stream is deleted there too,
since the job's results are what bulk readers read. The whole text is joined from what
this worker published (`TextLog`); a line taken over from a dead worker starts with
tokens that one published, read back from the response stream once, at the end. While
lines run, each transaction adds the tokens they generated to their jobs' `streamed`
counters, and a line that asked for logprobs gets them in its result (`bulk_progress`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from mii.broker_config.connection import retry_until
from mii.broker_config.jobs import RECORD_SCRIPT, result_payload
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.replay import replay
from mii.engine.outputs import RequestOutput
from mii.worker.bulk_progress import LogprobLog, streamed_commands, streamed_tokens
from mii.worker.intake import JobLine
from mii.worker.outcomes import Batch, Ending

log = logging.getLogger(__name__)
SWEEP_EVERY = 256  # transactions
STALE_S = 600.0  # a request silent this long was taken from us or handed back


@dataclass
class _Text:
    start: int  # token index of the first part held
    end: int  # token index the next output should start at
    parts: list[str] = field(default_factory=list)
    touched: float = 0.0


class TextLog:
    """The text each request generated on this worker, in token order."""

    def __init__(self) -> None:
        self._texts: dict[str, _Text] = {}

    def add(self, out: RequestOutput) -> None:
        held = self._texts.get(out.request_id)
        if held is None or out.first_token_index != held.end:
            # new here (or a gap: start over; the stream has what came before)
            held = self._texts[out.request_id] = _Text(out.first_token_index, 0)
        held.parts.append(out.text)
        held.end = out.first_token_index + len(out.token_ids)
        held.touched = time.monotonic()

    def pop(self, rid: str) -> tuple[int, str] | None:
        """(index of the first token covered, the text from there), if any."""
        held = self._texts.pop(rid, None)
        return None if held is None else (held.start, "".join(held.parts))

    def sweep(self, older_than_s: float = STALE_S) -> None:
        """Forget requests this worker stopped serving without a final chunk."""
        limit = time.monotonic() - older_than_s
        for rid in [r for r, t in self._texts.items() if t.touched < limit]:
            del self._texts[rid]


class JobRecorder:
    def __init__(self, redis, keys: DeploymentKeys, consumer: str, tokenizer=None) -> None:
        """`tokenizer` (the engine's, if it has one) gives logprobs their token texts."""
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self.texts = TextLog()
        self.logprobs = LogprobLog(tokenizer)
        self.recorded = 0
        self._transactions = 0

    def commands(self, batches: list[Batch]) -> list[tuple]:
        """Commands that record the job lines these batches end (their acks are in the same
        batches; a bulk line publishes no chunks: its result is what its readers read)."""
        records: dict[str, list] = {}  # job id -> RECORD_SCRIPT arguments
        streamed: dict[str, int] = {}  # job id -> tokens generated in these batches
        for batch in batches:
            for job, tokens in streamed_tokens(batch.outputs, _job_of(batch)).items():
                streamed[job] = streamed.get(job, 0) + tokens
            finals = self._finals(batch)
            for entry in batch.acks:
                line = entry.job
                if line is not None and line.rid in finals:
                    args = self._record_args(line, finals[line.rid])
                    records.setdefault(line.job, []).extend(args)
            for rid in finals:
                self.texts.pop(rid)
            self.logprobs.forget(finals)
        self._sweep_now_and_then()
        return self._script_calls(records) + streamed_commands(self.keys, streamed)

    def _finals(self, batch: Batch) -> dict[str, Ending]:
        """How each request this batch ends ended (the batch's outputs enter the log)."""
        finals = {}
        job_of = _job_of(batch)
        for out in batch.outputs:
            self.texts.add(out)
            if job_of(out.request_id) is not None:
                self.logprobs.add(out)
            if out.finished:
                finals[out.request_id] = Ending.of(out)
        finals.update((ending.rid, ending) for ending in batch.endings)
        return finals

    def _record_args(self, line: JobLine, final: Ending) -> list:
        held = self.texts.pop(line.rid)
        start, text = held if held is not None else (final.glen, "")
        if start > 0:
            text = self._published_text(line.rid, start) + text
        payload = result_payload(
            final.reason, text=text, plen=final.plen, glen=final.glen,
            error=final.error, etype=final.etype, worker=self.consumer,
            **self.logprobs.pop(line.rid),
        )  # fmt: skip
        self.recorded += 1
        return [line.line, payload, final.glen, 1 if final.error else 0]

    def _script_calls(self, records: dict[str, list]) -> list[tuple]:
        # EVAL, not EVALSHA: inside MULTI, a NOSCRIPT (a restarted Redis) would fail the
        # record alone while the final chunk and the ack commit, and the line never ends.
        calls = []
        for job_id, args in records.items():
            job_keys = self.keys.job(job_id).all()
            calls.append(("eval", RECORD_SCRIPT, len(job_keys), *job_keys, time.time(), *args))
        return calls

    def _published_text(self, rid: str, upto: int) -> str:
        """Text of the tokens before `upto` in the response stream (another worker's)."""
        key = self.keys.response(rid)
        entries = retry_until(lambda: self.redis.xrange(key), None, on_retry=_log_retry(key))
        replayed = replay(entries, upto)
        if len(replayed.token_ids) != upto:
            log.warning("request %s: the stream holds %d of %d earlier tokens", rid,
                        len(replayed.token_ids), upto)  # fmt: skip
        return replayed.text

    def _sweep_now_and_then(self) -> None:
        self._transactions += 1
        if self._transactions % SWEEP_EVERY == 0:
            self.texts.sweep()
            self.logprobs.sweep()


def _job_of(batch: Batch):
    """A request's bulk job in this batch, or None (an interactive request)."""

    def job_of(rid: str) -> str | None:
        entry = batch.entries.get(rid)
        return None if entry is None or entry.job is None else entry.job.job

    return job_of


def _log_retry(key: str):
    return lambda exc: log.warning("reading %s failed (%s); retrying", key, exc)
