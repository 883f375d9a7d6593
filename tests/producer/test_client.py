"""Client on fakeredis against a real WorkerLoop with the fake engine."""

from __future__ import annotations

import asyncio
import threading

import pytest
from fake_engine import FakeEngine, expected_text
from harness import wait_for

from mii.constants import GenerationFinishReason as Reason
from mii.errors import InvalidRequestError, QueueFullError, RequestTimeoutError

pytestmark = pytest.mark.timeout(30)


def test_bad_options_are_refused_before_anything_is_queued(harness):
    client = harness.client()
    with pytest.raises(InvalidRequestError, match="unknown generation option"):
        client.generate("hi", max_new_tokns=3)
    with pytest.raises(InvalidRequestError, match="top_p"):
        client.generate("hi", top_p=2.0)
    with pytest.raises(InvalidRequestError, match="non-empty"):
        client.generate(["ok", ""])
    with pytest.raises(InvalidRequestError, match="timeout"):
        client.generate("hi", timeout=-1)
    assert harness.redis.xlen(harness.keys.requests) == 0


def test_streaming_deltas_join_to_the_blocking_text(harness):
    harness.start()
    client = harness.client()
    deltas = list(client.stream("stream me", max_new_tokens=6))
    assert "".join(d.generated_text for d in deltas) == expected_text("stream me", 6)
    assert [d.generated_length for d in deltas] == [1, 2, 3, 4, 5, 6]
    assert deltas[-1].finish_reason == Reason.LENGTH
    assert all(d.finish_reason == Reason.NONE for d in deltas[:-1])


def test_streaming_fn_gets_lists_as_in_mii(harness):
    harness.start()
    seen = []
    responses = harness.client().generate("cb", streaming_fn=seen.append, max_new_tokens=3)
    assert all(isinstance(s, list) and len(s) == 1 for s in seen)
    assert "".join(s[0].generated_text for s in seen) == responses[0].generated_text
    with pytest.raises(InvalidRequestError, match="one prompt"):
        harness.client().generate(["a", "b"], streaming_fn=print)


def test_callable_client_and_return_full_text(harness):
    harness.start()
    (response,) = harness.client()("Hello", max_new_tokens=2, return_full_text=True)
    assert response.generated_text == "Hello" + expected_text("Hello", 2)


def test_async_generate_and_stream_inside_a_running_loop(harness):
    harness.start()
    client = harness.client()

    async def main():
        responses = await client.agenerate(["one", "two"], max_new_tokens=4)
        deltas = [d async for d in client.astream("three", max_new_tokens=3)]
        return responses, deltas

    responses, deltas = asyncio.run(main())
    assert [r.generated_text for r in responses] == [expected_text(p, 4) for p in ("one", "two")]
    assert "".join(d.generated_text for d in deltas) == expected_text("three", 3)


def test_sixteen_threads_share_one_client(harness):
    harness.start()
    client = harness.client()
    results: dict[int, str] = {}

    def run(i: int) -> None:
        results[i] = client.generate(f"prompt {i}", max_new_tokens=5)[0].generated_text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == {i: expected_text(f"prompt {i}", 5) for i in range(16)}


def test_queue_depth_limit_refuses_clearly_and_adds_nothing():
    from harness import Harness

    h = Harness(max_queue_depth=3)
    client = h.client()
    client.submit(["a", "b"], max_new_tokens=1)
    with pytest.raises(
        QueueFullError, match="holds 2 requests; adding 2 would pass its limit of 3"
    ):
        client.generate(["c", "d"], max_new_tokens=1)
    assert h.redis.xlen(h.keys.requests) == 2


def test_cancel_frees_the_engine_and_ends_the_stream(harness):
    engine = FakeEngine(step_delay_s=0.01)
    harness.start(engine)
    client = harness.client()
    sub = client.submit(["long one"], max_new_tokens=1000)
    rid = sub.requests[0].rid
    wait_for(lambda: rid in engine.requests, what="admitted")
    client.cancel(rid)
    sub.wait()
    (response,) = sub.responses()
    assert response.finish_reason == Reason.CANCELLED
    assert rid in engine.aborted and rid not in engine.requests
    assert 0 < response.generated_length < 1000


def test_closing_a_stream_early_cancels_it(harness):
    engine = FakeEngine(step_delay_s=0.005)
    harness.start(engine)
    stream = harness.client().stream("abandon me", max_new_tokens=1000)
    next(stream)
    stream.close()
    wait_for(lambda: engine.aborted and not engine.requests, what="abort")


def test_cancel_before_a_worker_reads_it(harness):
    client = harness.client()
    sub = client.submit(["queued"], max_new_tokens=5)
    client.cancel(sub.requests[0].rid)
    engine = FakeEngine()
    harness.start(engine)
    sub.wait()
    assert sub.responses()[0].finish_reason == Reason.CANCELLED
    assert engine.added == []


def test_deadline_stops_generation_and_frees_blocks(harness):
    engine = FakeEngine(step_delay_s=0.01)
    harness.start(engine)
    (response,) = harness.client().generate("slow", max_new_tokens=10_000, timeout=0.3)
    assert response.finish_reason == Reason.TIMEOUT
    assert engine.aborted and not engine.requests


def test_no_worker_means_a_timeout_error_not_a_hang(harness):
    with pytest.raises(RequestTimeoutError, match="no answer"):
        harness.client().generate("nobody home", max_new_tokens=2, timeout=0.1)


def test_cancelling_an_async_call_cancels_the_request(harness):
    engine = FakeEngine(step_delay_s=0.01)
    harness.start(engine)
    client = harness.client()

    async def main():
        task = asyncio.create_task(client.agenerate("long", max_new_tokens=10_000))
        while not engine.requests:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_for(lambda: engine.aborted and not engine.requests, what="abort")
