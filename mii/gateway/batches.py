"""OpenAI's Batch API over bulk jobs: a batch is the bulk job of the same id, its input an
uploaded file in OpenAI's batch form, its output and error files rendered from the job's
results when read.

Everything lives in Redis (the batch record, the job, its results), so any gateway of the
deployment answers for any batch, and a gateway that dies while it queues a batch's lines
loses nothing: queuing is idempotent (a line is queued once, whoever resubmits), and a
gateway resumes the unfinished submissions it finds when it starts or when asked about
them. Blocking methods: call them in a thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field

from mii.broker_config.connection import as_text
from mii.gateway.errors import bad_request, not_found
from mii.producer.bulk.input import BulkLine
from mii.producer.bulk.jobs import BulkJobs, read_input
from mii.producer.bulk.store import JobNotFoundError, JobState, JobStatus
from mii.producer.openai_params import CHAT, COMPLETIONS

log = logging.getLogger(__name__)
OUTPUT, ERRORS = "output", "errors"
_STATES = {
    JobState.SUBMITTING: "in_progress",
    JobState.RUNNING: "in_progress",
    JobState.DONE: "completed",
}


@dataclass(frozen=True)
class BatchRecord:
    """What a batch adds to its bulk job (stored as JSON under `keys.batch(id)`)."""

    id: str
    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict | None = None
    created_at: int = field(default_factory=lambda: int(time.time()))


def result_file_id(batch_id: str, kind: str) -> str:
    return f"file-{batch_id}-{kind}"


def parse_result_file_id(file_id: str) -> tuple[str, str] | None:
    """(batch id, OUTPUT or ERRORS) of a rendered file's id, else None."""
    for kind in (OUTPUT, ERRORS):
        suffix = f"-{kind}"
        if file_id.startswith("file-batch_") and file_id.endswith(suffix):
            return file_id[len("file-") : -len(suffix)], kind
    return None


class Batches:
    def __init__(self, client, files) -> None:
        """`client`: the deployment's `Client`; `files`: where uploads live."""
        self.client, self.files = client, files
        self.jobs = BulkJobs(client)
        self.redis, self.keys = client.redis, client.keys
        self.ttl_s = client.settings.bulk_job_ttl_s
        self._submitting: set[str] = set()
        self._lock = threading.Lock()

    # ---- create and queue ---------------------------------------------------------------
    def create(self, body: dict) -> dict:
        record = self._record(body)
        lines = self._input_lines(record)
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.batch(record.id), json.dumps(asdict(record)), ex=self.ttl_s)
        pipe.zadd(self.keys.batches, {record.id: record.created_at})
        pipe.execute()
        self._submit_in_background(record, lines)
        return self.describe(record, None)

    def _record(self, body: dict) -> BatchRecord:
        endpoint = body.get("endpoint")
        if endpoint not in (COMPLETIONS, CHAT):
            raise bad_request(f"endpoint must be {COMPLETIONS} or {CHAT}", "endpoint")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_request("input_file_id is required", "input_file_id")
        self.files.meta(file_id)  # 404 for an unknown file
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise bad_request("metadata must be an object", "metadata")
        batch_id = f"batch_{uuid.uuid4().hex[:24]}"
        window = str(body.get("completion_window") or "24h")
        return BatchRecord(batch_id, file_id, endpoint, window, metadata)

    def _input_lines(self, record: BatchRecord) -> list[str]:
        """The input's lines, checked: every line is for the batch's endpoint."""
        lines = self.files.content(record.input_file_id).decode("utf-8").splitlines()
        for line in read_input(lines).lines:
            url = line.openai_url if isinstance(line, BulkLine) else record.endpoint
            if url != record.endpoint:
                raise bad_request(f"line {line.line} is for {url}, the batch for "
                                  f"{record.endpoint}", "input_file_id")  # fmt: skip
        return lines

    def _submit_in_background(self, record: BatchRecord, lines: list[str] | None) -> None:
        with self._lock:
            if record.id in self._submitting:
                return
            self._submitting.add(record.id)
        threading.Thread(target=self._submit, args=(record, lines), daemon=True,
                         name=f"mii-batch-{record.id}").start()  # fmt: skip

    def _submit(self, record: BatchRecord, lines: list[str] | None) -> None:
        try:
            if lines is None:
                lines = self.files.content(record.input_file_id).decode("utf-8").splitlines()
            self.jobs.submit(read_input(lines, record.input_file_id), job_id=record.id)
        except Exception:  # noqa: BLE001 (resumed by the next gateway that looks)
            log.exception("queuing batch %s failed; it is resumed when asked about", record.id)
        finally:
            with self._lock:
                self._submitting.discard(record.id)

    def resume_all(self) -> None:
        """Resume the submissions that a gateway left unfinished (at start-up)."""
        for raw in self.redis.zrange(self.keys.batches, 0, -1):
            batch_id = as_text(raw)
            try:
                self.get(batch_id)
            except Exception:  # noqa: BLE001 (one broken record must not stop the others)
                log.exception("could not look at batch %s", batch_id)

    # ---- read ----------------------------------------------------------------------------
    def get(self, batch_id: str) -> dict:
        record = self._load(batch_id)
        status = self._status(batch_id)
        unqueued = status is None or (status.submitted < status.total and not status.cancelled)
        if unqueued:
            self._submit_in_background(record, None)
        return self.describe(record, status)

    def cancel(self, batch_id: str) -> dict:
        record = self._load(batch_id)
        if self._status(batch_id) is not None:
            self.jobs.cancel(batch_id)
        return self.describe(record, self._status(batch_id))

    def list(self, limit: int, after: str | None) -> dict:
        ids = [as_text(i) for i in self.redis.zrevrange(self.keys.batches, 0, -1)]
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        page = []
        for batch_id in ids:
            if len(page) > limit:
                break
            try:
                page.append(self.describe(self._load(batch_id), self._status(batch_id)))
            except Exception:  # noqa: BLE001 (expired meanwhile)
                continue
        data = page[:limit]
        return {"object": "list", "data": data, "has_more": len(page) > limit,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None}  # fmt: skip

    def result_file(self, batch_id: str, kind: str) -> bytes:
        """The output (successes) or error file of a finished batch, as JSONL."""
        self._load(batch_id)
        status = self._status(batch_id)
        if status is None or not status.complete:
            raise bad_request(f"batch {batch_id} has not finished; its files come at the end")
        out = []
        for record in self.jobs.results(batch_id):
            success = record["error"] is None and record["response"]["status_code"] == 200
            if success == (kind == OUTPUT):
                out.append(json.dumps(record, ensure_ascii=False) + "\n")
        return "".join(out).encode()

    def _load(self, batch_id: str) -> BatchRecord:
        raw = self.redis.get(self.keys.batch(batch_id)) if batch_id.startswith("batch_") else None
        if raw is None:
            raise not_found(f"No batch found with id '{batch_id}'")
        return BatchRecord(**json.loads(raw))

    def _status(self, batch_id: str) -> JobStatus | None:
        try:
            return self.jobs.status(batch_id)
        except JobNotFoundError:
            return None

    @staticmethod
    def describe(record: BatchRecord, status: JobStatus | None) -> dict:
        """OpenAI's batch object."""
        batch = asdict(record) | {"object": "batch", "errors": None, "status": "validating"}
        batch["expires_at"] = record.created_at + 24 * 3600
        if status is None:
            return batch | {"request_counts": {"total": 0, "completed": 0, "failed": 0}}
        return batch | _progress(record.id, status)


def _progress(batch_id: str, status: JobStatus) -> dict:
    counts = {"total": status.total, "completed": status.done - status.errors,
              "failed": status.errors}  # fmt: skip
    progress = {"request_counts": counts, "in_progress_at": int(status.created)}
    if status.cancelled is not None:
        progress["cancelling_at"] = int(status.cancelled)
    if not status.complete:
        state = "cancelling" if status.cancelled is not None else _STATES[status.state]
        return progress | {"status": state}
    ended = int(status.finished or status.cancelled or time.time())
    if status.cancelled is not None:
        progress |= {"status": "cancelled", "cancelled_at": ended}
    else:
        progress |= {"status": "completed", "completed_at": ended, "finalizing_at": ended}
    if counts["completed"]:
        progress["output_file_id"] = result_file_id(batch_id, OUTPUT)
    if counts["failed"]:
        progress["error_file_id"] = result_file_id(batch_id, ERRORS)
    return progress
