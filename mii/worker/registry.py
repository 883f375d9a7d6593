"""Each worker's status in the deployment's `workers` hash: what the launcher's ready check,
`terminate_server` and operators read."""

from __future__ import annotations

import json
import os
import socket
import time

from mii.broker_config.deployment import (  # noqa: F401 (the states, re-exported)
    DRAINING,
    EXITED,
    FAILED,
    READY,
    STARTING,
)
from mii.broker_config.keys import DeploymentKeys


class WorkerRegistry:
    def __init__(self, redis, keys: DeploymentKeys, consumer: str, **identity) -> None:
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self.identity = {"host": socket.gethostname(), "pid": os.getpid(), **identity}
        self.started = time.time()

    def report(self, state: str, **info) -> None:
        status = {**self.identity, "state": state, "started": self.started, **info}
        status["heartbeat"] = time.time()
        self.redis.hset(self.keys.workers, self.consumer, json.dumps(status))

    def remove(self) -> None:
        self.redis.hdel(self.keys.workers, self.consumer)
