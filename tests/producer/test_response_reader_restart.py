"""The shared reader across a real Redis restart (a private redis-server with AOF): the
read in flight breaks, the reader reconnects with backoff, and the stream goes on from
the last entry it saw, each token once."""

from __future__ import annotations

import asyncio

import pytest
import redis as redis_py
from redis_server import RedisServer

from mii.broker_config import wire
from mii.config import MIIConfig
from mii.producer.client import Client
from mii.producer.response_reader import ResponseReader

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


def _publish(connection, key: str, rid: str, i: int, text: str, final: bool = False) -> None:
    chunk = wire.chunk_fields(i=i, ids=[ord(text)], text=text, glen=i + 1, plen=7,
                              reason="length" if final else None)  # fmt: skip
    connection.xadd(key, {wire.PAYLOAD: wire.reply_payload({rid: chunk})})


async def _queued(connection, stream: str) -> wire.RequestMessage:
    """The first request in `stream`, once there is one (this test is the worker)."""
    async with asyncio.timeout(10):
        while not (entries := connection.xrange(stream)):
            await asyncio.sleep(0.01)
    return wire.decode_request(entries[0][1])


def test_a_stream_goes_on_after_a_redis_restart(server, monkeypatch):
    failures: list[BaseException] = []
    failed = ResponseReader._failed

    def record(reader, started: float, exc: BaseException) -> None:
        failures.append(exc)
        failed(reader, started, exc)

    monkeypatch.setattr(ResponseReader, "_failed", record)
    config = MIIConfig(model_config={"model_name_or_path": "fake"}, deployment_name="restart-dep")
    client = Client(config, server.url)
    worker = redis_py.Redis.from_url(server.url)

    async def main():
        deltas = client.astream("restart", max_new_tokens=2)
        first = asyncio.create_task(anext(deltas))  # submits, then waits on the reader
        message = await _queued(worker, client.keys.requests)
        key, rid = client.keys.replies(message.reply), message.rid
        _publish(worker, key, rid, 0, "a")
        assert (await asyncio.wait_for(first, 10)).generated_text == "a"
        second = asyncio.create_task(anext(deltas))  # the reader blocks on the stream again
        await asyncio.sleep(0.05)
        await asyncio.to_thread(server.restart, 0.5)
        _publish(worker, key, rid, 1, "b", final=True)
        last = await asyncio.wait_for(second, 20)
        rest = [d async for d in deltas]
        return last, rest, client._aredis().readers[0]

    try:
        last, rest, reader = asyncio.run(main())
    finally:
        worker.close()
    assert last.generated_text == "b" and last.finish_reason is not None and rest == []
    assert failures and all(isinstance(e, redis_py.ConnectionError) for e in failures)
    assert reader.failing_since is None  # it read again after the restart
