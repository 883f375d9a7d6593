"""The publisher thread: chunk payloads follow the wire schema, one transaction per batch,
and a lost connection is retried with the same commands, in order."""

from __future__ import annotations

import dataclasses
import time

import fakeredis
import pytest
import redis

from mii.broker_config import wire
from mii.broker_config.keys import DeploymentKeys
from mii.constants import GenerationFinishReason as Reason
from mii.engine.outputs import RequestOutput, TokenLogprob
from mii.worker.intake import Entry
from mii.worker.outcomes import Batch
from mii.worker.publisher import Publisher

pytestmark = pytest.mark.timeout(20)
KEYS = DeploymentKeys("pub")


def _output(rid: str, index: int, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        request_id=rid,
        token_ids=(65 + index,),
        text=chr(65 + index),
        first_token_index=index,
        prompt_length=3,
        generated_length=index + 1,
        finished=finished,
        finish_reason=Reason.LENGTH if finished else None,
        logprobs=(TokenLogprob(65 + index, -0.5),),
    )


class FlakyRedis(fakeredis.FakeRedis):
    """Fails the first `failures` transactions as if the connection dropped."""

    failures = 2

    def pipeline(self, transaction=True, shard_hint=None):
        pipe = super().pipeline(transaction, shard_hint)
        if FlakyRedis.failures > 0:
            FlakyRedis.failures -= 1

            def fail(*args, **kwargs):
                raise redis.ConnectionError("connection lost")

            pipe.execute = fail
        return pipe


def test_chunks_follow_the_schema_and_finals_ack_in_the_same_transaction():
    client = fakeredis.FakeRedis()
    client.xadd(KEYS.requests, {"x": 1}, id="1-1")
    publisher = Publisher(client, KEYS, "host:1", ttl_s=60)
    publisher.start()
    publisher.refresh_ttl("r1")
    publisher.put(Batch(outputs=[_output("r1", 0)]))
    publisher.put(Batch(outputs=[_output("r1", 1, True)], acks=[Entry(KEYS.requests, "1-1")]))
    assert publisher.flush(5)
    publisher.stop()
    chunks = [wire.decode_chunk(f) for _, f in client.xrange(KEYS.response("r1"))]
    assert [(c.i, c.ids, c.text, c.lp) for c in chunks] == [
        (0, [65], "A", [-0.5]),
        (1, [66], "B", [-0.5]),
    ]
    assert chunks[1].final and chunks[1].reason == Reason.LENGTH and chunks[1].worker == "host:1"
    assert 0 < client.ttl(KEYS.response("r1")) <= 60
    assert client.xlen(KEYS.requests) == 0  # acked and deleted with the final chunk
    assert publisher.tokens_published == 2 and publisher.transactions >= 1


def test_lost_connection_is_retried_with_the_same_commands():
    server = fakeredis.FakeServer()
    FlakyRedis.failures = 2
    publisher = Publisher(FlakyRedis(server=server), KEYS, "host:1", ttl_s=60)
    publisher.start()
    publisher.refresh_ttl("r2")
    publisher.put(Batch(outputs=[_output("r2", 0)]))
    assert publisher.flush(10)
    publisher.stop()
    check = fakeredis.FakeRedis(server=server)
    assert check.xlen(KEYS.response("r2")) == 1
    assert check.ttl(KEYS.response("r2")) > 0  # the EXPIRE survived the retries
    assert publisher.failed_attempts == 2


def test_logprob_chunks_carry_token_texts_and_alternatives_as_version_2():
    from mii.worker.publisher import _chunk

    class Letters:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(i) for i in ids)

    out = _output("r1", 0)
    plain = wire.decode_chunk({wire.PAYLOAD: wire.pack(_chunk(out, "w", None))})
    assert plain.v == 1 and plain.toks is None and plain.lp == [-0.5]
    top = (TokenLogprob(65, -0.5, ((65, -0.5), (66, -1.5))),)
    rich = wire.decode_chunk(
        {wire.PAYLOAD: wire.pack(_chunk(dataclasses.replace(out, logprobs=top), "w", Letters()))}
    )
    assert rich.v == 2 and rich.toks == ["A"]
    assert rich.top == [[(65, -0.5, "A"), (66, -1.5, "B")]]


def _step(index: int, n: int, entries: dict, finished: bool = False) -> Batch:
    outputs = [_output(f"q{r}", index, finished) for r in range(n)]
    return Batch(outputs=outputs, entries=entries)


@pytest.mark.parametrize(("running", "entries_written"), [(40, 2), (8, 3)])
def test_big_steps_within_the_publish_interval_go_out_as_one_chunk_a_request(
    running, entries_written
):
    """40 requests (at least COALESCE_FROM): the first step goes out at once, the next two,
    ended within the interval, as one reply entry with both steps' tokens of each request.
    8 requests: every step as it ends."""
    client = fakeredis.FakeRedis()
    entries = {f"q{r}": Entry(KEYS.requests, f"1-{r}", reply="c1") for r in range(running)}
    publisher = Publisher(client, KEYS, "host:1", ttl_s=60, publish_interval_s=1.0)
    publisher.start()
    publisher.put(_step(0, running, entries))
    assert publisher.flush(5)
    publisher.put(_step(1, running, entries))
    time.sleep(0.2)  # the thread holds step 1 (a big one) for the interval, or sent it
    publisher.put(_step(2, running, entries, finished=True))
    assert publisher.flush(5)
    publisher.stop()
    replies = [wire.decode_reply(f) for _, f in client.xrange(KEYS.replies("c1"))]
    assert len(replies) == entries_written
    by_request: dict[str, list] = {}
    for reply in replies:
        for rid, chunk in reply:
            by_request.setdefault(rid, []).append(chunk)
    for chunks in by_request.values():
        tokens = [(c.i + k, t) for c in chunks for k, t in enumerate(c.ids)]
        assert tokens == [(0, 65), (1, 66), (2, 67)]  # each index once, in order
        assert "".join(c.text for c in chunks) == "ABC"
        assert [lp for c in chunks for lp in c.lp] == [-0.5] * 3
        assert chunks[-1].final and chunks[-1].reason == Reason.LENGTH
    assert publisher.tokens_published == 3 * running


def test_a_chunk_that_does_not_follow_gets_an_entry_of_its_own():
    """A request resumed within the interval starts again at an earlier index: its chunks
    are not merged (the client takes each index once from the entries in order)."""
    client = fakeredis.FakeRedis()
    entries = {f"q{r}": Entry(KEYS.requests, f"1-{r}", reply="c1") for r in range(40)}
    publisher = Publisher(client, KEYS, "host:1", ttl_s=60, publish_interval_s=1.0)
    publisher.start()
    publisher.put(_step(0, 40, entries))
    assert publisher.flush(5)
    publisher.put(_step(1, 40, entries))
    time.sleep(0.2)
    publisher.put(Batch(outputs=[_output("q0", 0)], entries=entries))  # q0 resumed at 0
    assert publisher.flush(5)
    publisher.stop()
    replies = [dict(wire.decode_reply(f)) for _, f in client.xrange(KEYS.replies("c1"))]
    assert [(r["q0"].i, r["q0"].ids) for r in replies if "q0" in r] == [
        (0, [65]), (1, [66]), (0, [65])
    ]  # fmt: skip
    assert [r["q1"].i for r in replies if "q1" in r] == [0, 1]
