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
        (msgpack.packb({"v": 4, "rid": "a", "prompt": "p"}), "v"),
        (msgpack.packb({"v": 3, "rid": "a", "prompt": "p", "reply": "x:y"}), "reply"),
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


def test_v2_requests_carry_chats_and_job_lines_and_v1_stays_readable():
    chat = wire.RequestMessage(
        rid="j-3", messages=[{"role": "user", "content": "hi"}], job="j", line=3
    )
    fields = wire.request_fields(chat)
    assert msgpack.unpackb(fields[wire.PAYLOAD])["v"] == 2  # the lowest that carries it
    assert wire.decode_request(fields) == chat and chat.prompt == ""
    old = {wire.PAYLOAD: msgpack.packb({"v": 1, "rid": "a", "prompt": "p", "params": {}})}
    assert wire.decode_request(old).job is None


@pytest.mark.parametrize(
    "fields, problem",
    [
        (dict(prompt="p", messages=[{"role": "user", "content": "x"}]), "not both"),
        (dict(prompt="p", job="j"), "together"),
        (dict(prompt="p", job="bad job", line=1), "job"),
    ],
)
def test_inconsistent_v2_requests_are_refused(fields, problem):
    payload = msgpack.packb({"v": 2, "rid": "a", **fields})
    with pytest.raises(wire.WireError, match=problem):
        wire.decode_request({wire.PAYLOAD: payload})


def test_line_results_match_their_schema():
    from mii.broker_config import jobs

    payload = jobs.result_payload("stop", text="hi", plen=2, glen=1, error=None, worker="w:1")
    result = jobs.decode_result(payload)
    assert (result.text, result.reason, result.error, result.worker) == ("hi", "stop", None, "w:1")
    failed = jobs.decode_result(jobs.result_payload("error", error="bad", etype="invalid_request"))
    assert failed.etype == wire.ErrorKind.INVALID_REQUEST


def test_v3_requests_name_a_reply_stream():
    message = wire.RequestMessage(rid="r", prompt="p", reply="c1")
    fields = wire.request_fields(message)
    assert msgpack.unpackb(fields[wire.PAYLOAD])["v"] == wire.REQUEST_WIRE_VERSION == 3
    assert wire.decode_request(fields).reply == "c1"


def test_reply_entries_carry_the_chunks_of_several_requests():
    chunks = {
        "r1": wire.chunk_fields(i=0, ids=[5, 6], text="ab", plen=3, glen=2),
        "r2": wire.chunk_fields(i=4, reason="stop", worker="w", plen=1, glen=4),
    }
    decoded = wire.decode_reply({wire.PAYLOAD: wire.reply_payload(chunks)})
    assert [(rid, c.ids, c.final) for rid, c in decoded] == [
        ("r1", [5, 6], False),
        ("r2", [], True),
    ]
    bad = {wire.PAYLOAD: wire.reply_payload({"r1": {"v": 1, "ids": "nope"}})}
    with pytest.raises(wire.WireError, match="reply entry"):
        wire.decode_reply(bad)
