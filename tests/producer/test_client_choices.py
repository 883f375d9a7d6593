"""The client's chat prompts, `n` choices and `astream_many`, on fakeredis."""

from __future__ import annotations

import asyncio

import pytest
from bulk_engine import CountingEngine, chat_text
from fake_engine import expected_text

from mii.broker_config import wire
from mii.errors import InvalidRequestError
from mii.params import GenerateParams
from mii.producer.submit import Chat, build_requests

pytestmark = pytest.mark.timeout(30)
CHAT = [{"role": "user", "content": "Hi"}]


def test_a_chat_is_answered_through_the_workers_template(harness):
    harness.start(CountingEngine())
    (response,) = harness.client().generate(Chat(CHAT), max_new_tokens=5)
    assert response.generated_text == expected_text(chat_text(CHAT), 5)
    with pytest.raises(InvalidRequestError, match="role and a content"):
        harness.client().generate(Chat([{"content": "no role"}]))


def test_n_choices_are_prompt_major_with_their_own_seeds():
    messages = build_requests(["a", "b"], GenerateParams(seed=7), None, n=3)
    assert [m.prompt for m in messages] == ["a"] * 3 + ["b"] * 3
    assert [m.params["seed"] for m in messages[:3]] == [7, 8, 9]
    sampled = build_requests(["a"], GenerateParams(), None, n=3)
    assert len({m.params["seed"] for m in sampled}) == 3
    greedy = build_requests(["a"], GenerateParams(do_sample=False), None, n=2)
    assert all("seed" not in m.params for m in greedy)
    with pytest.raises(InvalidRequestError, match="n must be"):
        build_requests(["a"], GenerateParams(), None, n=0)


def test_generate_with_n_returns_n_responses_per_prompt(harness):
    harness.start()
    responses = harness.client().generate(["x", "yy"], n=2, max_new_tokens=3)
    assert [r.generated_text for r in responses] == [expected_text("x", 3)] * 2 + [
        expected_text("yy", 3)
    ] * 2


def test_astream_many_tags_each_delta_with_its_request(harness):
    harness.start()
    client = harness.client()

    async def collect():
        texts: dict[int, str] = {}
        async for index, delta in client.astream_many(["p", "qq"], n=2, max_new_tokens=4):
            texts[index] = texts.get(index, "") + delta.generated_text
        return texts

    texts = asyncio.run(collect())
    assert texts == {0: expected_text("p", 4), 1: expected_text("p", 4),
                     2: expected_text("qq", 4), 3: expected_text("qq", 4)}  # fmt: skip


def test_a_cancelled_async_reader_still_cancels_its_requests(harness):
    """A web server cancels the task of a client that went away, maybe more than once (on
    fakeredis nothing waits inside the cleanup; tests/gateway checks it on a real Redis)."""
    client = harness.client()  # no worker: the request stays queued

    async def abandon():
        stream = client.astream("never answered", max_new_tokens=4)
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.sleep(0)
        task.cancel()  # anyio cancels again at every await
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.2)

    asyncio.run(abandon())
    entries = harness.redis.xrange(harness.keys.control)
    ops = [wire.decode_control(fields).op for _, fields in entries]
    assert ops == ["cancel"]
