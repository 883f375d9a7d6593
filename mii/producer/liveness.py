"""The client's liveness signal: a key with a TTL that workers watch.

A client process that dies (SIGKILL, a lost host) cannot cancel its requests, and they
would generate to their length limit. So while a call waits, its client keeps
`keys.client_alive(<host>:<pid>)` alive: the submit script sets it, and the waiting loops
refresh it every third of `client_timeout_s` (per `Client`, however many calls wait).
Workers cancel the interactive requests of a client whose key expired.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from mii.broker_config.keys import DeploymentKeys, process_name


class ClientLiveness:
    def __init__(
        self,
        keys: DeploymentKeys,
        client_timeout_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keys, self.clock = keys, clock
        self.ttl_s = None if client_timeout_s is None else math.ceil(client_timeout_s)
        self.every_s = None if client_timeout_s is None else client_timeout_s / 3
        self._last = -math.inf
        self._lock = threading.Lock()

    @property
    def key(self) -> str:
        return self.keys.client_alive(process_name())  # the pid changes in a forked child

    def due(self) -> bool:
        """Whether to refresh the key now; True once per period (the caller refreshes)."""
        if self.every_s is None:
            return False
        with self._lock:
            now = self.clock()
            if now - self._last < self.every_s:
                return False
            self._last = now
            return True

    def next_due(self) -> float | None:
        """When the key is next to be refreshed (the clock's time), None if never."""
        return None if self.every_s is None else self._last + self.every_s

    def refreshed(self) -> None:
        """The key was just set (by the submit script)."""
        with self._lock:
            self._last = self.clock()
