"""The wire schema: msgpack maps validated by pydantic, versioned, no pickle."""

from __future__ import annotations

import pickle

import msgpack
import pytest

from mii.broker_config import wire
from mii.constants import GenerationFinishReason

pytestmark = pytest.mark.timeout(5)


def test_request_round_trip():
    msg = wire.RequestMessage(rid="abc123", prompt=[1, 2, 3], params={"top_k": 5}, timeout_s=2.5)
    fields = wire.request_fields(msg)
    assert fields[wire.RID] == b"abc123"
    assert wire.decode_request(fields) == msg
    assert msgpack.unpackb(fields[wire.PAYLOAD])["v"] == wire.WIRE_VERSION


def test_worker_chunks_match_the_schema():
    payload = wire.chunk_payload(i=3, ids=[7], text="x", plen=4, glen=4, reason="stop")
    chunk = wire.decode_chunk({wire.PAYLOAD: payload})
    assert chunk.final and chunk.reason == GenerationFinishReason.STOP and chunk.ids == [7]


@pytest.mark.parametrize(
    "payload, problem",
    [
        (b"\xc1", "not msgpack"),
        (msgpack.packb([1, 2]), "not a map"),
        (msgpack.packb({"v": 3, "rid": "a", "prompt": "p"}), "v"),
        (msgpack.packb({"v": 1, "rid": "a b", "prompt": "p"}), "rid"),
        (msgpack.packb({"v": 1, "rid": "a", "prompt": 5}), "prompt"),
        (msgpack.packb({"v": 1, "rid": "a", "prompt": "p", "extra": 1}), "extra"),
        (pickle.dumps({"v": 1, "rid": "a", "prompt": "p"}), "msgpack|map"),
    ],
)
def test_bad_payloads_raise_wire_errors(payload, problem):
    with pytest.raises(wire.WireError, match=problem):
        wire.decode_request({wire.PAYLOAD: payload})


def test_control_messages():
    fields = wire.control_fields(wire.ControlMessage(op="cancel", rid="r1"))
    assert wire.decode_control(fields).rid == "r1"
    with pytest.raises(wire.WireError):
        wire.decode_control({wire.PAYLOAD: msgpack.packb({"v": 1, "op": "explode"})})
