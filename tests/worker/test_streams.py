"""The worker's busy-time read (one Lua round trip) on a real Redis: control messages,
interactive entries before bulk ones."""

from __future__ import annotations

import shutil

import pytest
from redis_server import RedisServer

from mii.broker_config import wire
from mii.broker_config.connection import connect
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.worker.streams import Reader

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]


@pytest.fixture(scope="module")
def redis():
    server = RedisServer().start()
    yield connect(server.url)
    server.stop()


def _add(redis, stream: str, rid: str) -> None:
    redis.xadd(stream, wire.request_fields(wire.RequestMessage(rid=rid, prompt="p")))


@pytest.mark.parametrize("script", [True, False])
def test_interactive_first_then_bulk_and_control(redis, script):
    keys = DeploymentKeys(f"reader-{script}")
    for stream in keys.request_streams():
        redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    reader = Reader(redis, keys, "me:1", script=script)
    reader.start_after_latest_control()
    _add(redis, keys.bulk, "b1")
    _add(redis, keys.requests, "i1")
    _add(redis, keys.requests, "i2")
    redis.xadd(keys.control, wire.control_fields(wire.ControlMessage(op="cancel", rid="i1")))
    control, entries = reader.poll(count=8, block_ms=None)
    assert [wire.decode_control(c).rid for c in control] == ["i1"]
    assert [f[wire.RID] for _, f in entries] == [b"i1", b"i2"]
    assert {e.stream for e, _ in entries} == {keys.requests}
    control, entries = reader.poll(count=8, block_ms=None)
    assert control == [] and [f[wire.RID] for _, f in entries] == [b"b1"]
    assert reader.poll(count=0, block_ms=None) == ([], [])
