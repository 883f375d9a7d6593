"""Every Redis key and stream name of a deployment, in one place.

With one partition (`broker.partitions`, the default) every key of a deployment shares the
hash tag `{<deployment>}`: one slot, so one Redis (or one primary of a Redis Cluster).

With K partitions the interactive request stream is split into K streams, each under a
hash tag of its own (`mii:{<deployment>.p<i>}:requests`), chosen so that partition i's slot
lies in the i-th K-th of the cluster's 16384 slots: with the even split that
`redis-cli --cluster create` makes, K a multiple of the primaries puts as many partitions
on each. A request's own keys (claim, cancel marker, response stream) and a reply stream
live in the partition their id falls in (`partition(id)`: CRC32 mod K), and a client
queues a call's requests in the partition of the call's reply stream, drawing their ids
there (`new_id`): each multi-key transaction of a request (its final chunk with the ack of
its entry, its claim) stays in one slot. The deployment-wide keys (config, state, workers,
control, dead letters, bulk stream and jobs, gateway files) stay under `{<deployment>}`.
"""

from __future__ import annotations

import functools
import os
import re
import socket
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

T = TypeVar("T")

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


def slot(key: str) -> int:
    """The Redis Cluster hash slot of a key (its hash tag's, when it has one)."""
    return key_slot(key.encode())


def by_slot(items: Iterable[T], key_of: Callable[[T], str]) -> list[list[T]]:
    """`items` grouped by the slot of each one's key, in order within a group: what one
    transaction on a Redis Cluster may hold."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(slot(key_of(item)), []).append(item)
    return list(groups.values())


@functools.cache
def partition_tags(deployment: str, partitions: int) -> tuple[str, ...]:
    """The hash tag of each partition: the deployment's own for one partition; else
    `<deployment>.p<i>`, with a `.<n>` suffix where needed to land in the i-th K-th of
    the slots (a few tries each: CRC16 spreads names evenly)."""
    if partitions == 1:
        return (deployment,)
    tags = []
    for i in range(partitions):
        low = i * REDIS_CLUSTER_HASH_SLOTS // partitions
        high = (i + 1) * REDIS_CLUSTER_HASH_SLOTS // partitions
        tag, n = f"{deployment}.p{i}", 0
        while not low <= slot("{" + tag + "}") < high:
            n += 1
            tag = f"{deployment}.p{i}.{n}"
        tags.append(tag)
    return tuple(tags)


@dataclass(frozen=True)
class DeploymentKeys:
    """Key names of one deployment, over `partitions` request-stream partitions (the
    deployment's `broker.partitions`; every process of a deployment must use the same)."""

    deployment: str
    partitions: int = 1

    def __post_init__(self) -> None:
        check_deployment_name(self.deployment)
        if not isinstance(self.partitions, int) or self.partitions < 1:
            raise ValueError(f"partitions must be a positive integer, got {self.partitions!r}")

    @property
    def prefix(self) -> str:
        return f"mii:{{{self.deployment}}}"

    # ---- partitions ---------------------------------------------------------------------
    def partition(self, id_: str) -> int:
        """The partition a request id or reply stream name falls in."""
        if self.partitions == 1:
            return 0
        return zlib.crc32(id_.encode()) % self.partitions

    def new_id(self, partition: int | None = None) -> str:
        """A fresh random id (request id, reply stream name), in `partition` if given: ids
        are drawn until one falls there (K tries on average)."""
        while True:
            id_ = uuid.uuid4().hex
            if partition is None or self.partition(id_) == partition:
                return id_

    def _of(self, id_: str) -> str:
        """The key prefix of the partition `id_` falls in."""
        return f"mii:{{{partition_tags(self.deployment, self.partitions)[self.partition(id_)]}}}"

    @property
    def prefixes(self) -> tuple[str, ...]:
        """The key prefix of the deployment-wide keys, then each partition's (with one
        partition, the one prefix): every key of the deployment starts with one of them."""
        tags = partition_tags(self.deployment, self.partitions)
        return tuple(dict.fromkeys([self.prefix, *(f"mii:{{{tag}}}" for tag in tags)]))

    @property
    def request_partitions(self) -> tuple[str, ...]:
        """The interactive request stream of each partition (read by group `workers`)."""
        tags = partition_tags(self.deployment, self.partitions)
        return tuple(f"mii:{{{tag}}}:requests" for tag in tags)

    def requests_of(self, id_: str) -> str:
        """The request stream of the partition `id_` (a reply stream's name) falls in."""
        return self.request_partitions[self.partition(id_)]

    @property
    def requests(self) -> str:
        """Interactive requests (stream, read by group `workers`): partition 0's stream,
        with one partition the only one."""
        return self.request_partitions[0]

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
        return f"{self._of(request_id)}:resp:{request_id}"

    def replies(self, name: str) -> str:
        """A reply stream: the chunks of every request that names it (`reply`), several
        requests an entry (one XADD a worker step for all of a client's requests). Its
        requests are queued in its partition."""
        return f"{self._of(name)}:replies:{name}"

    def claim(self, request_id: str) -> str:
        """String: `<stream> <entry id>` of the entry a worker serves this request from, set
        (NX) when a worker takes it and kept `response_ttl_s` after: a second entry of the
        same request id is dropped, and a client whose request vanished from Redis (queue,
        claim and response stream all gone) learns that it was lost."""
        return f"{self._of(request_id)}:claim:{request_id}"

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
        return f"{self._of(request_id)}:cancelled:{request_id}"

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

    def request_streams(self) -> tuple[str, ...]:
        """Request streams in the order workers serve them: the partitions, then bulk."""
        return (*self.request_partitions, self.bulk)
