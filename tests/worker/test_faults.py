"""One request, one client or one Redis event never takes a worker down (WorkerLoop on
fakeredis with the fake engine; the same faults with real processes and a real Redis are
in test_fault_processes.py)."""

from __future__ import annotations

import json
import time

import pytest
from fake_engine import FakeEngine, expected_text
from harness import Harness, wait_for

from mii.broker_config import wire
from mii.broker_config.deployment import EXITED
from mii.broker_config.keys import WORKER_GROUP
from mii.constants import GenerationFinishReason as Reason

pytestmark = pytest.mark.timeout(60)


def _chunks(harness, rid):
    return harness.response_chunks(rid)


def test_a_request_that_breaks_steps_is_dead_lettered_and_the_rest_are_served(harness):
    loop = harness.start()
    client = harness.client(delete_responses=False)
    sub = client.submit(["good one", "POISON pill", "another"], max_new_tokens=6)
    good, poison, other = (r.rid for r in sub.requests)
    final = wait_for(lambda: [c for c in _chunks(harness, poison) if c.final], what="error")
    assert final[0].reason == Reason.ERROR and "failed 3 times" in final[0].error
    for rid, prompt in ((good, "good one"), (other, "another")):
        done = wait_for(lambda r=rid: [c for c in _chunks(harness, r) if c.final], what="done")
        assert done[0].reason == Reason.LENGTH
        text = "".join(c.text for c in _chunks(harness, rid))
        assert text == expected_text(prompt, 6)  # each token once, in order
    letters = harness.redis.xrange(harness.keys.deadletter)
    assert [f[b"rid"] for _, f in letters] == [poison.encode()]
    assert not harness.errors and loop.stats.step_failures == 3
    assert client.generate("still serving", max_new_tokens=3)[0].generated_length == 3
    wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="all acked")


def test_a_second_entry_of_a_running_request_is_dropped():
    harness = Harness()
    try:
        harness.start(FakeEngine(step_delay_s=0.01))
        other = harness.start(FakeEngine(step_delay_s=0.01), consumer="testhost:2")
        message = wire.RequestMessage(rid="twice", prompt="hello", params={"max_new_tokens": 30})
        harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
        wait_for(lambda: _chunks(harness, "twice"), what="first tokens")
        harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
        wait_for(lambda: any(c.final for c in _chunks(harness, "twice")), what="done")
        chunks = _chunks(harness, "twice")
        indices = [i for c in chunks for i in range(c.i, c.i + len(c.ids))]
        assert indices == list(range(30))  # one generation, not two interleaved
        wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="copy acked")
        assert sum(loop.stats.duplicates for loop, _ in harness.workers) == 1
        assert other is not None
    finally:
        harness.stop()


def test_a_copy_of_a_finished_request_is_not_served_again(harness):
    harness.start()
    message = wire.RequestMessage(rid="once", prompt="hi", params={"max_new_tokens": 3})
    harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
    wait_for(lambda: any(c.final for c in _chunks(harness, "once")), what="done")
    harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
    wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="copy acked")
    assert len([c for c in _chunks(harness, "once") if c.final]) == 1


def test_requests_of_a_client_that_went_away_are_cancelled():
    harness = Harness(client_timeout_s=0.3)
    try:
        engine = FakeEngine(step_delay_s=0.01)
        loop = harness.start(engine)
        alive = harness.keys.client_alive("gonehost:7")
        harness.redis.set(alive, 1, px=300)
        message = wire.RequestMessage(
            rid="orphan", prompt="x", params={"max_new_tokens": 100_000}, client="gonehost:7"
        )
        harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
        wait_for(lambda: loop.active, what="admitted")
        final = wait_for(lambda: [c for c in _chunks(harness, "orphan") if c.final], what="cancel")
        assert final[0].reason == Reason.CANCELLED and "orphan" in engine.aborted
        assert loop.stats.abandoned == 1 and not loop.active
    finally:
        harness.stop()


def test_a_client_that_keeps_its_key_fresh_is_not_cancelled():
    harness = Harness(client_timeout_s=0.3)
    try:
        harness.start(FakeEngine(step_delay_s=0.01))
        alive = harness.keys.client_alive("livehost:8")
        message = wire.RequestMessage(
            rid="kept", prompt="x", params={"max_new_tokens": 120}, client="livehost:8"
        )
        harness.redis.set(alive, 1, px=300)
        harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
        while not any(c.final for c in _chunks(harness, "kept")):
            harness.redis.set(alive, 1, px=300)
            time.sleep(0.05)
        assert _chunks(harness, "kept")[-1].reason == Reason.LENGTH
    finally:
        harness.stop()


def test_requests_of_a_worker_known_dead_are_taken_over_at_once():
    harness = Harness(reclaim_idle_s=60.0, heartbeat_interval_s=0.05)
    try:
        client = harness.client()
        sub = client.submit(["orphaned"], max_new_tokens=4)
        harness.redis.xgroup_create(harness.keys.requests, WORKER_GROUP, id="0", mkstream=True)
        harness.redis.xreadgroup(WORKER_GROUP, "deadhost:9", {harness.keys.requests: ">"})
        status = {"host": "deadhost", "pid": 9, "state": EXITED, "heartbeat": time.time()}
        harness.redis.hset(harness.keys.workers, "deadhost:9", json.dumps(status))
        time.sleep(0.6)  # longer than the takeover's minimum idle time, far below 60 s
        loop = harness.start()
        started = time.monotonic()
        sub.wait()
        assert sub.responses()[0].generated_text == expected_text("orphaned", 4)
        assert time.monotonic() - started < 5 and loop.stats.reclaimed == 1
    finally:
        harness.stop()


def test_a_redis_that_comes_back_empty_is_set_up_again(harness):
    loop = harness.start()
    client = harness.client()
    assert client.generate("before", max_new_tokens=2)[0].generated_length == 2
    harness.redis.flushall()
    wait_for(lambda: harness.redis.exists(harness.keys.config), what="record restored")
    assert client.generate("after", max_new_tokens=3)[0].generated_text == expected_text("after", 3)
    assert not harness.errors and loop.stats.steps > 0
    assert harness.redis.hexists(harness.keys.workers, loop.consumer)


def test_a_request_running_through_a_flush_still_finishes(harness):
    engine = FakeEngine(step_delay_s=0.3)  # slow steps: nothing is published near the flush
    harness.start(engine)
    client = harness.client(delete_responses=False)
    running = client.submit(["long"], max_new_tokens=150)
    deltas = iter(running)
    text = "".join(next(deltas)[1].generated_text for _ in range(3))  # a client reading
    harness.redis.flushall()  # the entry, the claim and the stream so far: all gone
    engine.step_delay_s = 0.005
    text += "".join(delta.generated_text for _, delta in deltas)
    assert text == expected_text("long", 150)
    assert running.responses()[0].generated_length == 150
    assert not harness.errors


def test_terminate_ends_running_and_queued_requests_with_an_error():
    harness = Harness(admit_batch=2)
    try:
        engine = FakeEngine(step_delay_s=0.01, max_num_seqs=2)
        loop = harness.start(engine)
        client = harness.client(delete_responses=False)
        sub = client.submit([f"job {i}" for i in range(4)], max_new_tokens=100_000)
        wait_for(lambda: len(loop.active) == 2, what="two running")
        harness.redis.xadd(
            harness.keys.control, wire.control_fields(wire.ControlMessage(op="terminate"))
        )
        wait_for(lambda: not harness.workers[0][1].is_alive(), what="worker stopped")
        ended = [_chunks(harness, r.rid) for r in sub.requests[:2]]
        assert all(c[-1].reason == Reason.ERROR and "terminated" in c[-1].error for c in ended)
        assert not engine.requests  # their KV blocks are free
        pending = harness.redis.xpending(harness.keys.requests, WORKER_GROUP)["pending"]
        assert pending == 0 and harness.redis.xlen(harness.keys.requests) == 2  # never read
    finally:
        harness.stop()


def test_a_long_tokenization_does_not_stall_other_streams(harness):
    harness.start(FakeEngine(step_delay_s=0.005, slow_tokenize_s=1.5))
    client = harness.client(delete_responses=False)
    runner = client.submit(["streaming"], max_new_tokens=400)
    time.sleep(0.2)
    slow = client.submit(["SLOW " + "x" * 1000], max_new_tokens=2)
    slow.wait()
    runner.wait()
    stamps = [int(i.split(b"-")[0]) for i, _ in harness.redis.xrange(runner.requests[0].key)]
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    assert max(gaps) < 500  # ms; tokenizing on the step thread would stall it 1500 ms


def test_an_oversized_entry_is_refused_before_it_is_decoded():
    harness = Harness(max_request_bytes=1000)
    try:
        harness.start()
        message = wire.RequestMessage(rid="huge", prompt="y" * 10_000)
        harness.redis.xadd(harness.keys.requests, wire.request_fields(message))
        final = wait_for(lambda: _chunks(harness, "huge"), what="refusal")[-1]
        assert final.reason == Reason.ERROR and "over this deployment's limit" in final.error
    finally:
        harness.stop()


def test_the_dead_letter_stream_is_bounded():
    harness = Harness(deadletter_maxlen=5)
    try:
        harness.start()
        for _ in range(30):
            harness.redis.xadd(harness.keys.requests, {"garbage": "1"})
        wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="all refused")
        assert harness.redis.xlen(harness.keys.deadletter) == 5
    finally:
        harness.stop()


def test_a_worker_that_starts_during_terminate_does_not_serve(harness):
    from mii.broker_config.deployment import TERMINATING, set_state

    set_state(harness.redis, harness.keys, TERMINATING)
    harness.client().submit(["too late"], max_new_tokens=2)
    loop = harness.loop()
    loop.run()  # returns: the worker stops at once
    assert harness.redis.xlen(harness.keys.requests) == 1 and loop.stats.received == 0


def test_a_worker_keeps_saying_it_is_starting_while_its_engine_loads():
    from mii.worker.hosting import _still_starting

    class Registry:
        reports = 0

        def report(self, state):
            self.reports += 1

    registry = Registry()
    with _still_starting(registry, interval_s=0.05):
        time.sleep(0.4)
    assert registry.reports >= 4
