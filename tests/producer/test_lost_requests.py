"""No call waits forever (issue 12, item 2, the client's side): a default deadline, a
request that vanished from Redis, a deployment that failed."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from fake_engine import FakeEngine, expected_text
from harness import Harness

from mii.broker_config import wire
from mii.errors import DeploymentFailedError, RequestLostError, RequestTimeoutError
from mii.producer import request_set

pytestmark = pytest.mark.timeout(30)
GRACE_S = 0.2


@pytest.fixture
def harness():
    h = Harness(lost_request_grace_s=GRACE_S, request_timeout_s=7.0)
    yield h
    h.stop()


def _queued_timeouts(h: Harness) -> list:
    return [wire.decode_request(f).timeout_s for _, f in h.redis.xrange(h.keys.requests)]


def test_the_default_timeout_applies_and_none_means_no_deadline(harness):
    client = harness.client()
    default = client._submit(["default"], {})  # the request sets themselves, below
    explicit = client._submit(["explicit"], {"timeout": 2})
    endless = client._submit(["endless"], {"timeout": None})
    assert _queued_timeouts(harness) == [7.0, 2.0, None]
    assert default.requests[0].give_up_at is not None
    assert endless.requests[0].give_up_at is None and endless.block_ms() == 1000
    assert explicit.requests[0].give_up_at < default.requests[0].give_up_at


def test_with_no_worker_the_default_timeout_ends_the_call(monkeypatch):
    monkeypatch.setattr(request_set, "DEADLINE_GRACE_S", 0.05)
    h = Harness(request_timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(RequestTimeoutError, match="no answer within its timeout of 0.2s"):
        h.client().generate("nobody serves this")
    assert time.monotonic() - start < 2


def test_a_request_flushed_from_redis_fails_instead_of_hanging(harness):
    client = harness.client()
    requests = client.submit(["to be flushed"], max_new_tokens=2)
    harness.redis.flushall()  # a Redis that came back empty
    start = time.monotonic()
    with pytest.raises(RequestLostError, match="vanished from Redis.*flushed.*persistence"):
        requests.wait()
    assert time.monotonic() - start < GRACE_S + 0.5  # not a read timeout later


def test_async_calls_notice_a_lost_request_too(harness):
    client = harness.client()

    async def main():
        task = asyncio.create_task(client.agenerate("to be flushed", max_new_tokens=2))
        await asyncio.sleep(0.05)
        harness.redis.flushall()
        await task

    with pytest.raises(RequestLostError, match="vanished"):
        asyncio.run(main())


def test_a_request_that_waits_its_turn_is_not_lost(harness):
    """Queued for several grace periods, then a worker comes: served, no false alarm."""
    client = harness.client()
    threading.Timer(5 * GRACE_S, harness.start).start()
    (response,) = client.generate("patient", max_new_tokens=3)
    assert response.generated_text == expected_text("patient", 3)


def test_a_request_silent_between_slow_steps_is_not_lost(harness):
    harness.start(FakeEngine(step_delay_s=3 * GRACE_S))
    (response,) = harness.client().generate("slow steps", max_new_tokens=2)
    assert response.generated_text == expected_text("slow steps", 2)


def test_a_handed_back_request_is_found_by_its_claim(harness):
    """A draining worker requeues a request under a new entry and moves its claim there:
    the entry the client knows is gone, the claim shows the request is alive."""
    client = harness.client()
    requests = client.submit(["handed back"], max_new_tokens=2)
    stream, rid, old = (
        harness.keys.requests,
        requests.requests[0].rid,
        requests.requests[0].entry_id,
    )
    ((_, fields),) = harness.redis.xrange(stream, old, old)
    new = harness.redis.xadd(stream, fields).decode()
    harness.redis.xdel(stream, old)
    harness.redis.set(harness.keys.claim(rid), f"{stream} {new}")
    threading.Timer(4 * GRACE_S, harness.start).start()
    requests.wait()
    assert requests.responses()[0].generated_text == expected_text("handed back", 2)


def _fail(h: Harness, error: str) -> None:
    h.redis.hset(h.keys.state, mapping={"state": "failed", "error": error, "since": 0})


def test_a_failed_deployment_refuses_new_requests_and_queues_nothing(harness):
    _fail(harness, "worker 0 crashed 5 times in a minute:\nCUDA error")
    with pytest.raises(DeploymentFailedError, match="'test-dep' failed: worker 0 crashed"):
        harness.client().generate("hello")
    with pytest.raises(DeploymentFailedError):
        asyncio.run(harness.client().agenerate("hello"))
    assert harness.redis.xlen(harness.keys.requests) == 0


def test_a_deployment_that_fails_while_a_call_waits_ends_the_call(harness):
    client = harness.client()
    threading.Timer(0.05, _fail, args=(harness, "gave up restarting")).start()
    with pytest.raises(DeploymentFailedError, match="gave up restarting"):
        client.generate("waiting", max_new_tokens=2)
