"""Noticing clients that went away, so that their requests stop using the engine.

A waiting client refreshes its key `keys.client_alive(name)` (with a TTL of
`client_timeout_s`) while it reads its responses. The worker looks at the keys of the
clients of its interactive requests every heartbeat; a client whose key it saw before and
that has been missing for half that timeout more is gone (a killed process, a lost host),
and its requests are cancelled. Clients that never set the key (older ones) and bulk
lines, whose submitter need not wait, are never cancelled this way.
"""

from __future__ import annotations

import re
import time

from mii.broker_config.keys import DeploymentKeys

_CLIENT_NAME = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")


def watchable(client: str) -> bool:
    """A client name that can go into a key (it comes from the request entry)."""
    return bool(_CLIENT_NAME.match(client))


class ClientWatch:
    def __init__(self, redis, keys: DeploymentKeys, timeout_s: float | None) -> None:
        self.redis, self.keys, self.timeout_s = redis, keys, timeout_s
        self.last_seen: dict[str, float] = {}

    def gone(self, clients: set[str]) -> set[str]:
        """Which of these clients went away (one round trip)."""
        clients = {c for c in clients if watchable(c)}
        if self.timeout_s is None or not clients:
            self.last_seen.clear()
            return set()
        names = sorted(clients)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.exists(self.keys.client_alive(name))
        now, grace = time.monotonic(), self.timeout_s / 2
        gone = set()
        for name, alive in zip(names, pipe.execute(), strict=True):
            if alive:
                self.last_seen[name] = now
            elif name in self.last_seen and now - self.last_seen[name] > grace:
                gone.add(name)
        self.last_seen = {n: t for n, t in self.last_seen.items() if n in clients}
        return gone
