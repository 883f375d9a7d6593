"""Dead workers: reclaim continues from published tokens; repeat offenders are dead-lettered;
a stalled worker that lost its entries stops working on them."""

from __future__ import annotations

import contextlib
import time

import pytest
from fake_engine import FakeEngine, expected_text, token_for
from harness import wait_for

from mii.broker_config import wire
from mii.broker_config.keys import WORKER_GROUP
from mii.errors import GenerationError

pytestmark = pytest.mark.timeout(30)


def _dead_worker_takes(harness, consumer: str = "deadhost:1"):
    """A worker that read the next entry and then died (never acked it)."""
    for stream in harness.keys.request_streams():
        with contextlib.suppress(Exception):
            harness.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    reply = harness.redis.xreadgroup(WORKER_GROUP, consumer, {harness.keys.requests: ">"}, count=1)
    return reply[0][1][0][0]


def _publish_chunk(harness, sub, rid: str, **fields) -> None:
    """What a worker writes for one of `sub`'s requests: an entry of their reply stream."""
    payload = wire.reply_payload({rid: wire.chunk_fields(**fields)})
    harness.redis.xadd(sub.requests[0].key, {wire.PAYLOAD: payload})


def _publish(harness, sub, rid: str, prompt: str, start: int, stop: int) -> None:
    ids = list(prompt.encode())
    for k in range(start, stop):
        tok = token_for(ids, k)
        _publish_chunk(harness, sub, rid, i=k, ids=[tok], text=chr(tok), plen=len(ids),
                       glen=k + 1)  # fmt: skip


def test_reclaimed_request_continues_from_published_tokens(harness):
    client = harness.client(delete_responses=False)
    sub = client.submit(["resume me"], max_new_tokens=12)
    rid = sub.requests[0].rid
    _dead_worker_takes(harness)
    _publish(harness, sub, rid, "resume me", 0, 5)
    engine = FakeEngine()
    loop = harness.start(engine)
    sub.wait()
    (response,) = sub.responses()
    assert response.generated_text == expected_text("resume me", 12)
    assert engine.resumed_from[rid] == 5 and loop.stats.reclaimed == 1
    chunks = harness.response_chunks(rid)
    indices = [i for c in chunks for i in range(c.i, c.i + len(c.ids))]
    assert indices == list(range(12))  # each token index once in the stream itself


def test_request_finished_by_a_dead_worker_is_only_acked(harness):
    client = harness.client(delete_responses=False)
    sub = client.submit(["done already"], max_new_tokens=2)
    rid = sub.requests[0].rid
    _dead_worker_takes(harness)
    _publish(harness, sub, rid, "done already", 0, 2)
    _publish_chunk(harness, sub, rid, i=2, plen=12, glen=2, reason="length")
    engine = FakeEngine()
    harness.start(engine)
    wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="ack")
    assert engine.added == []


def test_request_delivered_too_often_is_dead_lettered(harness):
    client = harness.client()
    sub = client.submit(["kills workers"], max_new_tokens=3)
    entry_id = _dead_worker_takes(harness, "deadhost:1")
    for n in (2, 3):  # two more workers took it over and died too
        harness.redis.xclaim(harness.keys.requests, WORKER_GROUP, f"deadhost:{n}", 0, [entry_id])
    time.sleep(harness.settings.reclaim_idle_s)
    engine = FakeEngine()
    harness.start(engine)
    with pytest.raises(GenerationError, match="delivered 4 times.*dead-lettered"):
        sub.wait()
    letters = harness.redis.xrange(harness.keys.deadletter)
    assert letters[0][1][b"rid"] == sub.requests[0].rid.encode()
    assert engine.added == []


def test_worker_that_lost_its_entry_stops_working_on_it(harness):
    engine = FakeEngine(step_delay_s=0.01)
    loop = harness.start(engine)
    client = harness.client()
    sub = client.submit(["stolen"], max_new_tokens=10_000)
    rid = sub.requests[0].rid
    wait_for(lambda: rid in engine.requests, what="admitted")
    entry_id = loop.active[rid].entry.entry_id
    harness.redis.xclaim(harness.keys.requests, WORKER_GROUP, "otherhost:9", 0, [entry_id])
    wait_for(lambda: loop.stats.lost == 1, what="loss noticed")
    assert rid in engine.aborted and rid not in loop.active
