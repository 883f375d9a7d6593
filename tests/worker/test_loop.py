"""WorkerLoop on fakeredis with the fake engine: the data flow and the loop's decisions."""

from __future__ import annotations

import pytest
from fake_engine import FakeEngine, expected_text
from harness import wait_for

from mii.broker_config import wire
from mii.broker_config.keys import WORKER_GROUP
from mii.constants import GenerationFinishReason as Reason
from mii.worker.fault import EngineBroken

pytestmark = pytest.mark.timeout(30)


def test_blocking_generate_returns_the_engine_text(harness):
    harness.start()
    client = harness.client()
    responses = client.generate(["Hello", "DeepSpeed is"], max_new_tokens=5)
    assert [r.generated_text for r in responses] == [
        expected_text("Hello", 5),
        expected_text("DeepSpeed is", 5),
    ]
    assert [r.finish_reason for r in responses] == [Reason.LENGTH, Reason.LENGTH]
    assert responses[0].prompt_length == 5 and responses[0].generated_length == 5


def test_finished_entries_are_acked_and_deleted(harness):
    harness.start()
    harness.client().generate("Hi", max_new_tokens=3)
    wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="xdel")
    assert harness.redis.xpending(harness.keys.requests, WORKER_GROUP)["pending"] == 0


def test_one_transaction_per_step_carries_every_request(harness):
    loop = harness.start()
    harness.client().generate(["a", "b", "c", "d"], max_new_tokens=4)
    wait_for(lambda: loop.publisher.backlog == 0, what="publisher idle")
    assert loop.publisher.tokens_published == 16
    # the four requests were admitted together, so four steps publish everything
    assert loop.publisher.transactions <= loop.stats.steps


def test_interactive_before_bulk(harness):
    client = harness.client()
    bulk = client._submit(["bulk one"], {"max_new_tokens": 1}, stream=harness.keys.bulk)
    inter = client.submit(["interactive"], max_new_tokens=1)
    engine = FakeEngine()
    harness.start(engine)
    wait_for(lambda: len(engine.added) == 2, what="both admitted")
    assert engine.added == [inter.requests[0].rid, bulk.requests[0].rid]


def test_forged_entry_with_bad_params_gets_an_error_and_the_worker_goes_on(harness):
    harness.start()
    client = harness.client()
    forged = wire.RequestMessage(rid="forged1", prompt="x", params={"top_p": 7})
    harness.redis.xadd(harness.keys.requests, wire.request_fields(forged))
    chunks = wait_for(lambda: harness.response_chunks("forged1"), what="error chunk")
    assert chunks[-1].reason == Reason.ERROR and "top_p" in chunks[-1].error
    assert chunks[-1].etype == wire.ErrorKind.INVALID_REQUEST
    assert client.generate("still here", max_new_tokens=2)[0].generated_length == 2


def test_undecodable_entry_with_an_id_is_answered(harness):
    harness.start()
    harness.redis.xadd(harness.keys.requests, {"rid": "junk1", "m": b"\xc1\xff"})
    chunks = wait_for(lambda: harness.response_chunks("junk1"), what="error chunk")
    assert "malformed request entry" in chunks[-1].error


def test_entry_without_an_id_goes_to_the_dead_letter_stream(harness):
    harness.start()
    harness.redis.xadd(harness.keys.requests, {"garbage": "1"})
    letters = wait_for(lambda: harness.redis.xrange(harness.keys.deadletter), what="letter")
    assert b"no 'm' field" in letters[0][1][b"error"]
    assert harness.client().generate("ok", max_new_tokens=1)[0].generated_length == 1


def test_prompt_too_long_is_refused_by_the_worker(harness):
    harness.start(FakeEngine(max_model_len=16))
    with pytest.raises(Exception, match="leaves no room|longer than"):
        harness.client().generate("x" * 40, max_new_tokens=2)


def test_a_broken_engine_ends_the_loop_and_leaves_its_requests_pending(harness):
    harness.start()
    client = harness.client()
    sub = client.submit(["FATAL pill"], max_new_tokens=3)
    wait_for(lambda: harness.errors, what="engine failure")
    assert isinstance(harness.errors[0], EngineBroken) and "CUDA error" in str(harness.errors[0])
    pending = harness.redis.xpending(harness.keys.requests, WORKER_GROUP)
    assert pending["pending"] == 1 and sub.requests[0].rid


def test_drain_finishes_in_flight_work(harness):
    loop = harness.start(FakeEngine(step_delay_s=0.01))
    client = harness.client()
    sub = client.submit(["draining"], max_new_tokens=30)
    wait_for(lambda: loop.active, what="admitted")
    loop.drain()
    wait_for(lambda: not harness.workers[0][1].is_alive(), what="loop exit")
    chunks = harness.response_chunks(sub.requests[0].rid)
    assert chunks[-1].reason == Reason.LENGTH and chunks[-1].glen == 30


def test_stop_hands_work_back_and_another_worker_continues_it(harness):
    first = FakeEngine(step_delay_s=0.02)
    loop = harness.start(first)
    client = harness.client(delete_responses=False)
    sub = client.submit(["handed back"], max_new_tokens=40)
    rid = sub.requests[0].rid
    wait_for(lambda: len(harness.response_chunks(rid)) >= 3, what="some tokens")
    loop.stop()
    harness.workers[0][1].join(5)
    second = FakeEngine()
    harness.start(second)
    sub.wait()
    (response,) = sub.responses()
    assert response.generated_text == expected_text("handed back", 40)
    assert second.resumed_from[rid] >= 3
    indices = [i for c in harness.response_chunks(rid) for i in range(c.i, c.i + len(c.ids))]
    assert indices == list(range(40))


def test_a_second_entry_of_a_running_request_is_dropped(harness):
    engine = FakeEngine(step_delay_s=0.01)
    loop = harness.start(engine)
    client = harness.client()
    sub = client.submit(["twice"], max_new_tokens=20)
    wait_for(lambda: loop.active, what="admitted")
    harness.redis.xadd(harness.keys.requests, wire.request_fields(sub.requests[0].message))
    sub.wait()
    (response,) = sub.responses()
    assert response.generated_text == expected_text("twice", 20)
    assert engine.added.count(sub.requests[0].rid) == 1
    wait_for(lambda: harness.redis.xlen(harness.keys.requests) == 0, what="both acked")


def test_engine_failure_is_reported_in_the_worker_status(harness):
    from mii.broker_config.deployment import read_workers

    loop = harness.start()
    harness.client().submit(["FATAL"], max_new_tokens=2)
    wait_for(lambda: harness.errors, what="engine failure")
    status = read_workers(harness.redis, harness.keys)[loop.consumer]
    assert status["state"] == "failed" and "CUDA error" in status["error"]


def test_loop_accounts_its_time_outside_the_engine(harness):
    loop = harness.start(FakeEngine(step_delay_s=0.005))
    harness.client().generate(["a", "b"], max_new_tokens=20)
    assert loop.stats.steps >= 20
    assert 0 < loop.stats.step_s <= loop.stats.busy_s
    assert 0 <= loop.stats.overhead < 1
