"""A bulk job's record in Redis, from the producer's side: create it, queue its lines,
read its progress and results, cancel it. The layout and the scripts are in
`mii.broker_config.jobs`; the worker records results through the same layout."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum

from mii.broker_config import jobs
from mii.broker_config.connection import as_text
from mii.broker_config.jobs import LineInfo, LineResult
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys, JobKeys
from mii.errors import MIIError

READ_CHUNK = 1000  # lines per HMGET when reading results


class JobNotFoundError(MIIError):
    """No job of that id in this deployment (never submitted, or expired)."""


class JobState(str, Enum):
    SUBMITTING = "submitting"  # not every line is queued yet (or its submitter died)
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class JobStatus:
    """A job's counters as Redis holds them; any process can read them."""

    job_id: str
    total: int
    submitted: int
    done: int
    errors: int
    tokens: int
    """Tokens of the lines that ended."""
    created: float
    finished: float | None
    cancelled: float | None
    format: str
    model: str
    ttl_s: int
    streamed: int = 0
    """Tokens generated so far, running lines included (as workers count them)."""

    @property
    def tokens_so_far(self) -> int:
        return max(self.tokens, self.streamed)

    @property
    def state(self) -> JobState:
        if self.done >= self.total:
            return JobState.CANCELLED if self.cancelled else JobState.DONE
        if self.cancelled:
            return JobState.CANCELLED
        return JobState.RUNNING if self.submitted >= self.total else JobState.SUBMITTING

    @property
    def complete(self) -> bool:
        """Every line has its result."""
        return self.done >= self.total

    def as_dict(self) -> dict:
        return {"state": self.state.value, **dataclasses.asdict(self)}


def _status(job_id: str, raw: dict) -> JobStatus:
    meta = {as_text(k): as_text(v) for k, v in raw.items()}

    def number(name: str, kind=int, default=0):
        return kind(meta[name]) if name in meta else default

    return JobStatus(
        job_id=job_id,
        total=number("total"),
        submitted=number("submitted"),
        done=number("done"),
        errors=number("errors"),
        tokens=number("tokens"),
        created=number("created", float),
        finished=number("finished", float, None),
        cancelled=number("cancelled", float, None),
        format=meta.get("format", "mii"),
        model=meta.get("model", ""),
        ttl_s=number("ttl_s"),
        streamed=number("streamed"),
    )


class JobStore:
    def __init__(self, redis, keys: DeploymentKeys) -> None:
        self.redis, self.keys = redis, keys
        self._create = redis.register_script(jobs.CREATE_SCRIPT)
        self._submit = redis.register_script(jobs.SUBMIT_SCRIPT)
        self._cancel = redis.register_script(jobs.CANCEL_SCRIPT)

    # ---- creating and queuing -----------------------------------------------------------
    def fingerprint(self, job_id: str) -> str | None:
        value = self.redis.hget(self.keys.job(job_id).meta, "fingerprint")
        return None if value is None else as_text(value)

    def write_manifest(self, job_id: str, infos: dict[int, LineInfo], ttl_s: int) -> None:
        """Before the job exists: idempotent, so a submitter that died here is simply rerun."""
        key = self.keys.job(job_id).manifest
        items = list(infos.items())
        for start in range(0, len(items), READ_CHUNK):
            mapping = {line: jobs.info_payload(i) for line, i in items[start : start + READ_CHUNK]}
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(key, mapping=mapping)
            pipe.expire(key, ttl_s)
            pipe.execute()

    def create(self, job_id: str, fingerprint: str, meta: dict) -> str:
        """Create the job unless it exists; the fingerprint of the job under this id."""
        job = self.keys.job(job_id)
        args = [fingerprint]
        for name, value in {"created": time.time(), **meta}.items():
            args += [name, value if isinstance(value, str | int | float) else json.dumps(value)]
        return as_text(self._create(keys=list(job.all()), args=args))

    def submit(self, job_id: str, items: list[tuple], limit: int | None) -> int:
        """Queue lines (`(line, "q", rid, payload)` or `(line, "e", result, "")`) in order, up
        to the stream's depth limit; how many lines were taken (skipped ones included)."""
        job = self.keys.job(job_id)
        args: list = [time.time(), limit or 0]
        for item in items:
            args += list(item)
        return int(self._submit(keys=[*job.all(), self.keys.bulk], args=args))

    # ---- reading ----------------------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        raw = self.redis.hgetall(self.keys.job(job_id).meta)
        if not raw:
            raise JobNotFoundError(
                f"no bulk job {job_id!r} in deployment {self.keys.deployment!r} "
                "(never submitted, or its results expired)"
            )
        return _status(job_id, raw)

    def line_numbers(self, job_id: str) -> list[int]:
        return sorted(int(k) for k in self.redis.hkeys(self.keys.job(job_id).manifest))

    def results(
        self, job_id: str, lines: list[int]
    ) -> Iterator[tuple[int, LineInfo, LineResult | None]]:
        """Each line's info and result (None while it runs), in the order given."""
        job = self.keys.job(job_id)
        for start in range(0, len(lines), READ_CHUNK):
            chunk = lines[start : start + READ_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            pipe.hmget(job.manifest, chunk)
            pipe.hmget(job.results, chunk)
            infos, results = pipe.execute()
            for line, info, result in zip(chunk, infos, results, strict=True):
                decoded = None if result is None else jobs.decode_result(result)
                yield line, jobs.decode_info(info), decoded

    # ---- cancelling -------------------------------------------------------------------
    def cancel(self, job_id: str, lines: list[int], cancelled_payload: bytes) -> list[int]:
        """Record lines no worker holds as cancelled; return the lines workers hold."""
        job = self.keys.job(job_id)
        held: list[int] = []
        for start in range(0, len(lines), READ_CHUNK):
            chunk = lines[start : start + READ_CHUNK]
            args = [time.time(), WORKER_GROUP, cancelled_payload, *chunk]
            reply = self._cancel(keys=[*job.all(), self.keys.bulk], args=args)
            held += [int(line) for line in reply]
        return held

    def job_keys(self, job_id: str) -> JobKeys:
        return self.keys.job(job_id)
