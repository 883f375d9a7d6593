"""Claiming request ids, so that one request is served from one entry only.

A request id can reach the request streams twice (a client that retried its submit, a
forged copy). The first worker to take an id records which entry it serves it from
(`keys.claim(rid)`, SET NX); a worker that reads another entry of the same id later drops
that entry without a word to the client, whose stream the first one is writing. Taking an
entry over (a reclaim after its owner died) finds its own entry in the claim and goes on;
a handed-back request, requeued under a new entry marked `resume`, moves the claim along.
The claim outlives the request by `response_ttl_s`, so a late copy of a finished request
is dropped too, and a client can tell a request that Redis still holds from a lost one.
"""

from __future__ import annotations

from mii.broker_config.connection import as_text
from mii.broker_config.keys import DeploymentKeys, by_slot
from mii.worker.intake import Admission


def claim_value(adm: Admission) -> str:
    return f"{adm.entry.stream} {adm.entry.entry_id}"


class Claims:
    def __init__(self, redis, keys: DeploymentKeys, ttl_s: int) -> None:
        self.redis, self.keys, self.ttl_s = redis, keys, ttl_s

    def take(self, admissions: list[Admission]) -> list[bool]:
        """Claim each request for its entry, in one transaction per slot; False for the entries
        whose request id another entry holds (duplicates to drop)."""
        everyone = list(range(len(admissions)))
        groups = [everyone] if self.keys.partitions == 1 else by_slot(
            everyone, lambda i: self.keys.claim(admissions[i].rid)
        )  # fmt: skip
        taken = [False] * len(admissions)
        for group in groups:
            pipe = self.redis.pipeline(transaction=True)
            for adm in (admissions[i] for i in group):
                key, value = self.keys.claim(adm.rid), claim_value(adm)
                pipe.set(key, value, ex=self.ttl_s, nx=not adm.message.resume)
                pipe.get(key)
            for i, got in zip(group, pipe.execute()[1::2], strict=True):
                taken[i] = as_text(got) == claim_value(admissions[i])
        return taken

    def refresh(self, rids: list[str]) -> None:
        """Keep the claims of long-running requests from expiring under them."""
        if rids:
            pipe = self.redis.pipeline(transaction=False)
            for rid in rids:
                pipe.expire(self.keys.claim(rid), self.ttl_s)
            pipe.execute()
