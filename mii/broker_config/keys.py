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


def check_deployment_name(name: str) -> str:
    """Deployment names end up inside keys: no braces (hash tags), no spaces."""
    if not _NAME.match(name):
        raise ValueError(
            f"deployment name {name!r} must be 1-200 characters of letters, digits and ._:/@+=-"
        )
    return name


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

    def cancelled(self, request_id: str) -> str:
        """Marker (with a TTL) that a request was cancelled, for workers that read it later."""
        return f"{self.prefix}:cancelled:{request_id}"

    def request_streams(self) -> tuple[str, str]:
        """Request streams in the order workers serve them."""
        return (self.requests, self.bulk)
