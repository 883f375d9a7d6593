"""Offline bulk jobs: a JSONL input queued on a deployment's bulk stream under a job id.

    jobs = BulkJobs(mii.client("smollm2-mii-deployment"))
    status = jobs.submit(read_input("prompts.jsonl"), params={"max_new_tokens": 64})
    jobs.wait(status.job_id, progress=ProgressBar(status.job_id))
    for record in jobs.results(status.job_id): ...          # output objects, input order

The job lives in Redis, not in the submitting process: workers record each line's result
there as they finish it, so `status`, `wait`, `results` and `cancel` work from any
process, while or after the submitter runs. Submitting a job again (same input, same
options: the same job id) queues only the lines that were never queued; a line that cannot
be read or is refused becomes that line's error in the output. Workers read the bulk
stream only when no interactive request waits.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from mii.broker_config.jobs import LineInfo, result_payload
from mii.broker_config.keys import check_job_id, process_name
from mii.broker_config.wire import PAYLOAD, ErrorKind, RequestMessage, request_fields
from mii.constants import GenerationFinishReason as Reason
from mii.errors import InvalidRequestError, MIIError, RequestTimeoutError
from mii.params import GenerateParams
from mii.producer.bulk.input import BulkLine, LineError, read_lines
from mii.producer.bulk.output import output_record
from mii.producer.bulk.progress import ProgressBar
from mii.producer.bulk.store import JobStatus, JobStore
from mii.producer.submit import check_prompt_size

SUBMIT_BATCH = 256  # lines per submit script call
POLL_S = 0.5  # how often `wait` reads the job's counters
FULL_WAIT_S = (0.02, 0.25)  # first and longest pause while the bulk stream is full


class JobIncompleteError(MIIError):
    """Results were asked for before every line finished."""


@dataclass(frozen=True)
class JobInput:
    """A parsed input file: its lines (valid or not) and a digest of its text."""

    lines: list[BulkLine | LineError]
    digest: str
    name: str = ""


def read_input(source: str | Path | Iterable[str], name: str = "") -> JobInput:
    """Parse a JSONL file (path) or its lines; refuse an input with no line at all."""
    if isinstance(source, str | Path):
        name = name or str(source)
        with open(source, encoding="utf-8") as f:
            texts = f.read().splitlines()
    else:
        texts = [t.rstrip("\n") for t in source]
    digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()
    lines = list(read_lines(texts))
    if not lines:
        raise InvalidRequestError(f"input {name or '(lines)'} has no lines")
    return JobInput(lines, digest, name)


def line_seed(job_id: str, line: int) -> int:
    """A sampled line's seed when it names none: the same on every submit and takeover."""
    digest = hashlib.sha256(f"{job_id}:{line}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class BulkJobs:
    def __init__(self, client) -> None:
        """`client`: a `mii.producer.client.Client` of the deployment."""
        self.client = client
        self.store = JobStore(client.redis, client.keys)
        self.settings = client.settings
        self.model = client.mii_config.model_conf.model_name_or_path

    # ---- submit -------------------------------------------------------------------------
    def submit(
        self,
        job_input: JobInput,
        job_id: str | None = None,
        params: dict | None = None,
        ttl_s: int | None = None,
        batch: int = SUBMIT_BATCH,
        progress: ProgressBar | None = None,
        on_created: Callable[[str], None] | None = None,
    ) -> JobStatus:
        """Create the job (or find it), tell `on_created` its id, and queue every line not
        queued yet. Returns once all lines are queued; a full bulk stream
        (`max_bulk_depth`) makes it wait for room."""
        params = dict(params or {})
        GenerateParams.from_kwargs(**params)  # the job's defaults must be valid themselves
        fingerprint = _fingerprint(job_input, params)
        job_id = _checked(job_id or f"job-{fingerprint[:16]}")
        self._create(job_id, job_input, params, fingerprint, ttl_s or self.settings.bulk_job_ttl_s)
        if on_created is not None:
            on_created(job_id)
        items = [self._item(job_id, line, params) for line in job_input.lines]
        self._queue(job_id, items, max(1, batch), progress)
        return self.status(job_id)

    def _create(self, job_id, job_input: JobInput, params, fingerprint, ttl_s: int) -> None:
        existing = self._call(lambda: self.store.fingerprint(job_id))
        if existing is None:
            infos = {line.line: _info(line, params) for line in job_input.lines}
            self._call(lambda: self.store.write_manifest(job_id, infos, ttl_s))
            meta = dict(total=len(job_input.lines), ttl_s=ttl_s, model=self.model, params=params)
            meta.update(format=_format(job_input), source=job_input.name)
            existing = self._call(lambda: self.store.create(job_id, fingerprint, meta))
        if existing != fingerprint:
            raise InvalidRequestError(
                f"bulk job {job_id!r} exists with another input or other options; "
                "choose another job id"
            )

    def _item(self, job_id: str, line: BulkLine | LineError, params: dict) -> tuple:
        if isinstance(line, BulkLine):
            try:
                message = self._message(job_id, line, params)
            except InvalidRequestError as exc:
                line = LineError(line.line, line.id, str(exc))
            else:
                return (line.line, "q", message.rid, request_fields(message)[PAYLOAD])
        error = result_payload(Reason.ERROR, error=line.error, etype=ErrorKind.INVALID_REQUEST)
        return (line.line, "e", error, "")

    def _message(self, job_id: str, line: BulkLine, defaults: dict) -> RequestMessage:
        params = GenerateParams.from_kwargs(**{**defaults, **line.params})
        if line.prompt is not None:
            check_prompt_size(line.prompt, self.client.max_request_bytes)
        options = params.model_dump(exclude_defaults=True)
        if not params.greedy and params.seed is None:
            options["seed"] = line_seed(job_id, line.line)
        return RequestMessage(
            rid=self.store.job_keys(job_id).rid(line.line),
            prompt=line.prompt if line.prompt is not None else "",
            messages=line.messages,
            params=options,
            client=process_name(),
            job=job_id,
            line=line.line,
        )

    def _queue(self, job_id: str, items: list[tuple], batch: int, progress) -> None:
        limit, start, idle = self.settings.max_bulk_depth, 0, FULL_WAIT_S[0]
        while start < len(items):
            chunk = items[start : start + batch]
            taken = self._call(lambda c=chunk: self._submit_chunk(job_id, c, limit))
            start += taken
            if progress is not None:
                progress.update(self.status(job_id))
            if taken < len(chunk):  # the bulk stream is at its depth limit: wait for room
                time.sleep(idle)
                idle = min(FULL_WAIT_S[1], idle * 2)
            else:
                idle = FULL_WAIT_S[0]

    def _submit_chunk(self, job_id: str, chunk: list[tuple], limit: int | None) -> int:
        try:
            return self.store.submit(job_id, chunk, limit)
        except redis.ResponseError as exc:
            if "CANCELLED" in str(exc):
                raise MIIError(
                    f"bulk job {job_id!r} was cancelled; submit it under a new id"
                ) from None
            raise

    # ---- follow, read, cancel ---------------------------------------------------------
    def status(self, job_id: str) -> JobStatus:
        return self._call(lambda: self.store.status(_checked(job_id)))

    def wait(
        self,
        job_id: str,
        timeout_s: float | None = None,
        progress: ProgressBar | None = None,
        poll_s: float = POLL_S,
    ) -> JobStatus:
        """Until every line has its result (finished, failed or cancelled)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            status = self.status(job_id)
            if status.complete:
                if progress is not None:
                    progress.close(status)
                return status
            if progress is not None:
                progress.update(status)
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeoutError(
                    f"bulk job {job_id!r}: {status.done} of {status.total} lines done after "
                    f"{timeout_s}s"
                )
            time.sleep(poll_s)

    def results(self, job_id: str, partial: bool = False) -> Iterator[dict]:
        """Output objects in input order; with `partial`, those of finished lines so far."""
        status = self.status(job_id)
        if not status.complete and not partial:
            raise JobIncompleteError(
                f"bulk job {job_id!r}: {status.done} of {status.total} lines done; wait for "
                "it (mii bulk wait) or ask for partial results"
            )
        keys = self.store.job_keys(job_id)
        openai = status.format == "openai"
        lines = self._call(lambda: self.store.line_numbers(job_id))
        for line, info, result in self.store.results(job_id, lines):
            if result is not None:
                yield output_record(line, keys.rid(line), info, result, openai, status.model)

    def write_results(self, job_id: str, out, partial: bool = False) -> int:
        """Write the output JSONL to a text stream; how many lines were written."""
        n = 0
        for record in self.results(job_id, partial):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
        return n

    def cancel(self, job_id: str) -> JobStatus:
        """Stop the job: lines still queued are removed and recorded as cancelled; lines
        being generated are cancelled through the workers (they record them)."""
        self.status(job_id)  # a clear error for an unknown job
        lines = self._call(lambda: self.store.line_numbers(job_id))
        cancelled = result_payload(Reason.CANCELLED)
        held = self._call(lambda: self.store.cancel(job_id, lines, cancelled))
        keys = self.store.job_keys(job_id)
        for start in range(0, len(held), 500):
            rids = [keys.rid(line) for line in held[start : start + 500]]
            self._call(lambda r=rids: self.client.cancel_many(r))
        return self.status(job_id)

    def _call(self, operation):
        return self.client._call(operation)


def _checked(job_id: str) -> str:
    try:
        return check_job_id(job_id)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def _fingerprint(job_input: JobInput, params: dict) -> str:
    options = json.dumps(params, sort_keys=True)
    return hashlib.sha256(f"{job_input.digest}\n{options}".encode()).hexdigest()


def _info(line: BulkLine | LineError, defaults: dict) -> LineInfo:
    ident = line.id if line.id is not None else str(line.line)
    logprobs = {**defaults, **getattr(line, "params", {})}.get("logprobs")
    return LineInfo(id=ident, url=getattr(line, "openai_url", None), logprobs=logprobs)


def _format(job_input: JobInput) -> str:
    """OpenAI's output form when the input's valid lines are in OpenAI's batch form."""
    valid = [line for line in job_input.lines if isinstance(line, BulkLine)]
    return "openai" if valid and all(line.openai_url for line in valid) else "mii"
