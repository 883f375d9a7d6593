"""The client's liveness key (issue 12, item 6, the client's side): set with the submit,
refreshed while calls wait, at most every third of `client_timeout_s` per client."""

from __future__ import annotations

import asyncio

import pytest
from harness import Harness

from mii.broker_config.keys import DeploymentKeys, process_name
from mii.errors import RequestTimeoutError
from mii.producer import request_set
from mii.producer.liveness import ClientLiveness

pytestmark = pytest.mark.timeout(30)


def test_the_submit_sets_the_key_with_its_ttl():
    h = Harness(client_timeout_s=2.5)
    h.client().submit(["hi"])
    key = h.keys.client_alive(process_name())
    assert h.redis.get(key) == b"1" and 0 < h.redis.ttl(key) <= 3  # ceil(2.5)


def test_no_key_without_a_client_timeout():
    h = Harness(client_timeout_s=None)
    h.client().submit(["hi"])
    assert h.redis.keys(f"{h.keys.prefix}:client:*") == []


def _wait_without_workers(client, requests):
    with pytest.raises(RequestTimeoutError):
        requests.wait()


def test_waiting_calls_refresh_the_key(monkeypatch):
    monkeypatch.setattr(request_set, "DEADLINE_GRACE_S", 0.0)
    h = Harness(client_timeout_s=0.3)  # refreshed every 0.1 s, TTL 1 s
    client, key = h.client(), h.keys.client_alive(process_name())
    requests = client.submit(["waits"], timeout=0.4)
    h.redis.delete(key)
    _wait_without_workers(client, requests)
    assert h.redis.ttl(key) == 1


def test_async_waiting_calls_refresh_the_key(monkeypatch):
    monkeypatch.setattr(request_set, "DEADLINE_GRACE_S", 0.0)
    h = Harness(client_timeout_s=0.3)
    client, key = h.client(), h.keys.client_alive(process_name())

    async def main():
        requests = await client._asubmit(["waits"], {"timeout": 0.4})
        h.redis.delete(key)
        with pytest.raises(RequestTimeoutError):
            async for _ in client._afollow(requests):
                pass

    asyncio.run(main())
    assert h.redis.ttl(key) == 1


def test_the_refresh_is_rate_limited_per_client_not_per_call():
    now = [100.0]
    liveness = ClientLiveness(DeploymentKeys("dep"), 30.0, clock=lambda: now[0])
    assert liveness.ttl_s == 30 and liveness.key == f"mii:{{dep}}:client:{process_name()}"
    liveness.refreshed()  # by a submit
    calls_waiting = 8
    refreshes = []
    for _ in range(12):  # 12 rounds of 2 s, every waiting call asks each round
        now[0] += 2.0
        refreshes.append(sum(liveness.due() for _ in range(calls_waiting)))
    assert sum(refreshes) == 2 and max(refreshes) == 1  # at 10 s and at 20 s


def test_no_refresh_without_a_client_timeout():
    liveness = ClientLiveness(DeploymentKeys("dep"), None)
    assert liveness.ttl_s is None and not liveness.due()
