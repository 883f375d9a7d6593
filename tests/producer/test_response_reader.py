"""The asyncio client's shared reader: one XREAD for every stream a loop follows, each
call woken with its own deltas, and every promise of the per-call read kept (deadlines,
outages, cancellation, a Redis restart)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import redis
from fake_engine import FakeEngine, expected_text
from harness import Harness, wait_for

from mii.broker_config import wire
from mii.broker_config.keys import DeploymentKeys
from mii.errors import BrokerUnavailableError, GenerationError
from mii.params import GenerateParams
from mii.producer.outage import Abandoned
from mii.producer.request_set import RequestSet
from mii.producer.response_reader import ResponseReader
from mii.producer.submit import build_requests

pytestmark = pytest.mark.timeout(60)
KEYS = DeploymentKeys("reader-dep")


class StubRedis:
    """`xread` records the streams of each call; it answers with the next of `replies`
    (an exception is raised), else blocks its block time and answers nothing."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.replies: list = []

    async def xread(self, streams: dict, block: int):
        self.calls.append(dict(streams))
        if not self.replies:
            await asyncio.sleep(block / 1000)
            return None
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


REPLY = "loop1"
KEY = KEYS.replies(REPLY)


def _requests(*prompts: str) -> RequestSet:
    params = GenerateParams.from_kwargs(max_new_tokens=3)
    return RequestSet(KEYS, build_requests(list(prompts), params, None, reply=REPLY), params,
                      REPLY)  # fmt: skip


def _chunk(i: int, text: str, final: bool = False) -> dict:
    return wire.chunk_fields(i=i, ids=[ord(text)], text=text, glen=i + 1, plen=1,
                             reason="length" if final else None)  # fmt: skip


def _entry(n: int, chunks: dict[str, dict]):
    """Reply stream entry number `n`: request id -> chunk."""
    return f"1-{n}".encode(), {wire.PAYLOAD: wire.reply_payload(chunks)}


def _reply(*entries):
    return [(KEY.encode(), list(entries))]


def _reader(stub: StubRedis, reconnect_timeout_s: float = 5.0) -> ResponseReader:
    async def cancel_nothing() -> None:
        pass

    return ResponseReader(stub, KEY, reconnect_timeout_s, Abandoned(), cancel_nothing,
                          block_ms=10)  # fmt: skip


async def _until(predicate, what: str, timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.001)
    assert predicate(), what


def test_one_read_of_the_reply_stream_wakes_each_call_with_its_own():
    async def main():
        stub = StubRedis()
        reader = _reader(stub)
        sets = [_requests("a"), _requests("b"), _requests("c", "d")]
        followers = [reader.follow(s) for s in sets]
        rids = [r.rid for s in sets for r in s.requests]
        stub.replies.append(_reply(_entry(1, {rids[0]: _chunk(0, "x"), rids[3]: _chunk(0, "y")})))
        await asyncio.wait_for(followers[0].wait(5), 5)
        assert stub.calls[0] == {KEY: "0-0"}  # one stream for every call of the loop
        (first,) = followers[0].take()
        (last,) = followers[2].take()
        assert first[1].generated_text == "x" and last[0] is sets[2].requests[1]
        assert followers[1].take() == []
        await _until(lambda: len(stub.calls) > 1, "a second read")
        assert stub.calls[1] == {KEY: "1-1"}  # on from the last entry read
        for s in sets:
            reader.unfollow(s)

    asyncio.run(main())


def test_chunks_of_requests_nobody_here_follows_are_skipped():
    async def main():
        stub = StubRedis()
        reader = _reader(stub)
        mine = _requests("mine")
        follower = reader.follow(mine)
        gone = _requests("gone")  # a call that ended: its late chunks are nobody's
        entry = {gone.requests[0].rid: _chunk(0, "g"), mine.requests[0].rid: _chunk(0, "m")}
        stub.replies.append(_reply(_entry(1, entry)))
        await asyncio.wait_for(follower.wait(5), 5)
        assert [d.generated_text for _, d in follower.take()] == ["m"]
        reader.unfollow(mine)

    asyncio.run(main())


def test_the_reader_stops_when_nothing_is_followed_and_goes_on_from_where_it_was():
    async def main():
        stub = StubRedis()
        reader = _reader(stub)
        requests = _requests("once")
        follower = reader.follow(requests)
        stub.replies.append(_reply(_entry(7, {requests.requests[0].rid: _chunk(0, "z", True)})))
        await asyncio.wait_for(follower.wait(5), 5)
        assert requests.done and follower.take()[0][1].finish_reason is not None
        await _until(lambda: reader._task is None, "the reader to stop")  # nothing open
        calls = len(stub.calls)
        again = _requests("again")
        reader.follow(again)
        await _until(lambda: len(stub.calls) > calls, "a read for the new request")
        assert stub.calls[-1] == {KEY: "1-7"}
        reader.unfollow(requests)
        reader.unfollow(again)

    asyncio.run(main())


def test_a_request_that_cannot_be_assembled_fails_only_its_own_call():
    async def main():
        stub = StubRedis()
        reader = _reader(stub)
        broken, fine = _requests("broken"), _requests("fine")
        followers = reader.follow(broken), reader.follow(fine)
        entry = {broken.requests[0].rid: _chunk(5, "q"),  # token 5 before token 0
                 fine.requests[0].rid: _chunk(0, "f")}  # fmt: skip
        stub.replies.append(_reply(_entry(1, entry)))
        await asyncio.wait_for(followers[1].wait(5), 5)
        with pytest.raises(GenerationError, match="token 5 arrived before token 0"):
            followers[0].raise_error()
        assert followers[1].take()[0][1].generated_text == "f"
        reader.unfollow(broken)
        reader.unfollow(fine)

    asyncio.run(main())


def test_a_failing_reader_sets_each_calls_give_up_time_and_forgets_it_on_success():
    async def main():
        stub = StubRedis()
        reader = _reader(stub, reconnect_timeout_s=30.0)
        requests = _requests("outage")
        follower = reader.follow(requests)
        assert reader.give_up_at(follower) is None
        stub.replies += [redis.ConnectionError("refused")] * 2
        await asyncio.wait_for(follower.wait(5), 5)  # the failure wakes the call
        give_up_at = reader.give_up_at(follower)
        assert give_up_at is not None and give_up_at >= follower.since + 30.0
        assert isinstance(reader.failure, redis.ConnectionError)
        await _until(lambda: len(stub.calls) >= 3 and reader.failing_since is None, "recovery")
        assert reader.give_up_at(follower) is None and follower.error is None
        reader.unfollow(requests)

    asyncio.run(main())


# ---- through the client, on the fakeredis harness ------------------------------------------
class CountingRedis:
    """An asyncio Redis client that counts its XREAD calls."""

    def __init__(self, inner) -> None:
        self.inner, self.xreads = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def xread(self, *args, **kwargs):
        self.xreads += 1
        return await self.inner.xread(*args, **kwargs)


def _counting_client(harness: Harness, **kwargs):
    client = harness.client(**kwargs)
    counted: list[CountingRedis] = []

    def factory():
        import fakeredis

        counted.append(CountingRedis(fakeredis.FakeAsyncRedis(server=harness.server)))
        return counted[0]

    client._async_factory = factory
    return client, counted


def test_concurrent_streams_share_their_reads(harness):
    harness.start(FakeEngine(step_delay_s=0.01))
    client, counted = _counting_client(harness)
    prompts = [f"stream {i}" for i in range(16)]

    async def one(prompt: str) -> str:
        return "".join([d.generated_text async for d in client.astream(prompt, max_new_tokens=8)])

    async def main():
        return await asyncio.gather(*(one(p) for p in prompts))

    texts = asyncio.run(main())
    assert texts == [expected_text(p, 8) for p in prompts]
    tokens = 16 * 8
    assert counted[0].xreads < tokens / 2  # one read per token per stream before


def test_agenerate_and_astream_many_read_through_the_reader(harness):
    harness.start(FakeEngine(step_delay_s=0.005))
    client = harness.client()

    async def main():
        whole = await client.agenerate(["one", "two"], max_new_tokens=4)
        pieces: dict[int, str] = {}
        async for index, delta in client.astream_many(["one", "two"], max_new_tokens=4):
            pieces[index] = pieces.get(index, "") + delta.generated_text
        reader = client._aredis().readers[0]
        return whole, pieces, dict(reader._followers)

    whole, pieces, followed = asyncio.run(main())
    assert [r.generated_text for r in whole] == [expected_text("one", 4), expected_text("two", 4)]
    assert pieces == {0: expected_text("one", 4), 1: expected_text("two", 4)}
    assert followed == {}  # each call stopped following its streams


def test_a_cancelled_stream_is_unfollowed_and_its_request_cancelled(harness):
    engine = FakeEngine(step_delay_s=0.01)
    harness.start(engine)
    client = harness.client()

    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in client.astream("long", max_new_tokens=10_000):
                started.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(started.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        reader = client._aredis().readers[0]
        await _until(lambda: not reader._followers and reader._task is None, "unfollowed")

    asyncio.run(main())
    wait_for(lambda: engine.aborted, what="the engine to abort the request")
    assert not engine.requests


def test_a_short_outage_is_waited_out_by_every_call():
    h = Harness(reconnect_timeout_s=10.0)
    h.start(FakeEngine(step_delay_s=0.01))
    client = h.client()

    def blip() -> None:
        h.server.connected = False
        threading.Timer(0.3, setattr, args=(h.server, "connected", True)).start()

    async def main():
        calls = [client.agenerate(f"blip {i}", max_new_tokens=30) for i in range(4)]
        threading.Timer(0.1, blip).start()
        return await asyncio.gather(*calls)

    try:
        results = asyncio.run(main())
    finally:
        h.server.connected = True
        h.stop()
    assert [r.generated_text for (r,) in results] == [
        expected_text(f"blip {i}", 30) for i in range(4)
    ]


def test_a_long_outage_ends_each_waiting_call_with_broker_unavailable():
    h = Harness(reconnect_timeout_s=0.3)
    client = h.client()

    async def main():
        async def wait(prompt: str):
            async for _ in client.astream(prompt, max_new_tokens=2):
                pass

        tasks = [asyncio.create_task(wait(f"cut {i}")) for i in range(3)]
        await asyncio.sleep(0.05)  # submitted and waiting (no worker)
        h.server.connected = False
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        errors = asyncio.run(main())
    finally:
        h.server.connected = True
    assert all(isinstance(e, BrokerUnavailableError) for e in errors), errors
    assert len(client._abandoned.take()) == 3  # owed a cancel when Redis answers again


def test_a_consumer_that_falls_behind_gets_what_arrived_in_one_batch(harness):
    harness.start(FakeEngine(step_delay_s=0.005))
    client = harness.client()

    async def main():
        sizes, text = [], ""
        async for batch in client.astream_batches(["behind", "beside"], max_new_tokens=20):
            sizes.append(len(batch))
            text += "".join(delta.generated_text for index, delta in batch if index == 0)
            if len(sizes) == 1:
                await asyncio.sleep(0.3)  # dozens of engine steps pass meanwhile
        return sizes, text

    sizes, text = asyncio.run(main())
    assert text == expected_text("behind", 20)
    assert min(sizes) >= 1 and max(sizes) > 2  # both requests' deltas of several steps


def test_a_consumer_that_always_finds_deltas_waiting_still_refreshes_its_liveness():
    h = Harness(client_timeout_s=0.3)  # refreshed every 0.1 s
    h.start(FakeEngine(step_delay_s=0.005))
    client = h.client()
    refreshes: list[bool] = []
    due = client._liveness.due

    def counted_due() -> bool:
        refreshes.append(due())
        return refreshes[-1]

    client._liveness.due = counted_due

    async def main():
        batches = 0
        async for _ in client.astream_batches(["slow reader"], max_new_tokens=100):
            batches += 1
            await asyncio.sleep(0.02)  # deltas of several steps wait at every resume
        return batches

    try:
        batches = asyncio.run(main())
    finally:
        h.stop()
    assert batches < 100 and sum(refreshes) >= 2  # 100 steps of 5 ms: several periods
