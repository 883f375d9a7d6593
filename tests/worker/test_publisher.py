"""The publisher thread: chunk payloads follow the wire schema, one transaction per batch,
and a lost connection is retried with the same commands, in order."""

from __future__ import annotations

import dataclasses

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
