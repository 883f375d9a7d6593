"""Every Redis key and stream name of a deployment, in one place.

All keys of a deployment share the hash tag `{<deployment>}`, so a Redis Cluster keeps
them in one slot: the multi-key transactions and scripts of the queue stay legal there.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

WORKER_GROUP = "workers"
"""The consumer group every worker of a deployment reads the request streams through."""


def process_name() -> str:
    """`<hostname>:<pid>`: a worker's consumer name in the group (operators see in XPENDING
    which process holds what), and a client's name in its requests."""
    return f"{socket.gethostname()}:{os.getpid()}"


_NAME = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,200}$")
_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,48}$")


def check_deployment_name(name: str) -> str:
    """Deployment names end up inside keys: no braces (hash tags), no spaces."""
    if not _NAME.match(name):
        raise ValueError(
            f"deployment name {name!r} must be 1-200 characters of letters, digits and ._:/@+=-"
        )
    return name


def check_job_id(job_id: str) -> str:
    """Job ids end up inside keys and request ids (`<job>-<line>`, at most 64 characters)."""
    if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
        raise ValueError(f"job id {job_id!r} must be 1-48 characters of letters, digits, _ and -")
    return job_id


@dataclass(frozen=True)
class JobKeys:
    """Key names of one bulk job (see `mii.broker_config.jobs` for what each holds)."""

    prefix: str
    job_id: str

    def __post_init__(self) -> None:
        check_job_id(self.job_id)

    @property
    def base(self) -> str:
        return f"{self.prefix}:job:{self.job_id}"

    @property
    def meta(self) -> str:
        """Hash: the job's options and counters."""
        return f"{self.base}:meta"

    @property
    def manifest(self) -> str:
        """Hash: line number -> the line's id and output form."""
        return f"{self.base}:manifest"

    @property
    def submitted(self) -> str:
        """Hash: line number -> entry id of its request in the bulk stream."""
        return f"{self.base}:submitted"

    @property
    def results(self) -> str:
        """Hash: line number -> the line's result, recorded by the worker that ended it."""
        return f"{self.base}:results"

    def all(self) -> tuple[str, str, str, str]:
        """Every key of the job, in the order the job scripts take them."""
        return (self.meta, self.manifest, self.submitted, self.results)

    def rid(self, line: int) -> str:
        """The request id of a line: the same on every submit, so that a resubmitted line
        is recognised (and a worker drops a second entry of a running one)."""
        return f"{self.job_id}-{line}"


@dataclass(frozen=True)
class DeploymentKeys:
    """Key names of one deployment."""

    deployment: str

    def __post_init__(self) -> None:
        check_deployment_name(self.deployment)

    @property
    def prefix(self) -> str:
        return f"mii:{{{self.deployment}}}"

    @property
    def requests(self) -> str:
        """Interactive requests (stream, read by group `workers`)."""
        return f"{self.prefix}:requests"

    @property
    def bulk(self) -> str:
        """Bulk requests: read only when `requests` is empty."""
        return f"{self.prefix}:bulk"

    @property
    def deadletter(self) -> str:
        """Requests given up on: undecodable, or delivered too often."""
        return f"{self.prefix}:deadletter"

    @property
    def control(self) -> str:
        """Broadcast stream every worker reads: cancels and terminate."""
        return f"{self.prefix}:control"

    @property
    def config(self) -> str:
        """The deployment's MIIConfig as JSON (what `mii.client(name)` reads)."""
        return f"{self.prefix}:config"

    @property
    def workers(self) -> str:
        """Hash: consumer name -> JSON status of that worker (state, stats, heartbeat)."""
        return f"{self.prefix}:workers"

    def response(self, request_id: str) -> str:
        """One request's response stream: token chunks, then a final chunk."""
        return f"{self.prefix}:resp:{request_id}"

    def replies(self, name: str) -> str:
        """A reply stream: the chunks of every request that names it (`reply`), several
        requests an entry (one XADD a worker step for all of a client's requests)."""
        return f"{self.prefix}:replies:{name}"

    def claim(self, request_id: str) -> str:
        """String: `<stream> <entry id>` of the entry a worker serves this request from, set
        (NX) when a worker takes it and kept `response_ttl_s` after: a second entry of the
        same request id is dropped, and a client whose request vanished from Redis (queue,
        claim and response stream all gone) learns that it was lost."""
        return f"{self.prefix}:claim:{request_id}"

    def client_alive(self, client: str) -> str:
        """String with a TTL: refreshed by a client process while it waits for responses.
        Workers cancel the interactive requests of a client whose key expired."""
        return f"{self.prefix}:client:{client}"

    @property
    def state(self) -> str:
        """Hash: the deployment's state as its launcher sees it (`state`: serving or
        failed, `error`, `since`), e.g. failed when its workers keep crashing."""
        return f"{self.prefix}:state"

    def cancelled(self, request_id: str) -> str:
        """Marker (with a TTL) that a request was cancelled, for workers that read it later."""
        return f"{self.prefix}:cancelled:{request_id}"

    def job(self, job_id: str) -> JobKeys:
        """Keys of one bulk job of this deployment (same hash tag)."""
        return JobKeys(self.prefix, job_id)

    def file(self, file_id: str) -> str:
        """Hash: a file uploaded through the HTTP gateway's `/v1/files` (`meta`, `content`),
        with the TTL of the deployment's bulk jobs."""
        return f"{self.prefix}:file:{file_id}"

    def batch(self, batch_id: str) -> str:
        """String: an OpenAI batch created through the gateway (JSON: its input file, endpoint,
        metadata); its lines run as the bulk job of the same id. Same TTL as the job."""
        return f"{self.prefix}:batch:{batch_id}"

    @property
    def batches(self) -> str:
        """Sorted set: ids of the gateway's batches by creation time (`GET /v1/batches`)."""
        return f"{self.prefix}:batches"

    def request_streams(self) -> tuple[str, str]:
        """Request streams in the order workers serve them."""
        return (self.requests, self.bulk)
