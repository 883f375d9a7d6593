"""Bulk job lines through a real `WorkerLoop` on fakeredis: results recorded by the worker
with the final chunk, chat templates applied by the worker, interactive requests first,
a taken-over line's whole text, cancelling a running job."""

from __future__ import annotations

import json
import time

import pytest
from bulk_engine import CountingEngine, chat_text
from fake_engine import FakeEngine, expected_text
from harness import Harness, wait_for

from mii.broker_config import wire
from mii.broker_config.keys import WORKER_GROUP
from mii.constants import GenerationFinishReason as Reason
from mii.engine.outputs import RequestOutput
from mii.producer.bulk.jobs import BulkJobs, read_input
from mii.worker.intake import Entry, JobLine
from mii.worker.outcomes import Batch, Ending
from mii.worker.publisher import Publisher

pytestmark = pytest.mark.timeout(30)
CHAT = [{"role": "user", "content": "hi there"}]


def test_worker_records_each_line_with_its_final_chunk(harness):
    harness.start(CountingEngine(max_model_len=64))
    bulk = BulkJobs(harness.client())
    lines = [{"prompt": f"line {i}", "params": {"max_new_tokens": 3 + i % 4}} for i in range(12)]
    lines[3] = {"messages": CHAT, "id": "chat"}
    lines[5] = {"prompt": "x" * 80}  # longer than the model's context: the worker refuses it
    lines[7] = {"prompt": "y", "params": {"top_p": 3}}  # refused at submit
    job_input = read_input([json.dumps(x) for x in lines])
    status = bulk.submit(job_input, job_id="w1", params={"max_new_tokens": 5})
    status = bulk.wait("w1", timeout_s=10, poll_s=0.01)
    assert (status.done, status.errors) == (12, 2)
    out = list(bulk.results("w1"))
    assert [r["line"] for r in out] == list(range(12))
    for i, record in enumerate(out):
        n = 3 + i % 4
        if i == 3:
            assert record["text"] == expected_text(chat_text(CHAT), 5) and record["id"] == "chat"
        elif i == 5:
            assert "no room to generate" in record["error"] or "longer" in record["error"]
        elif i == 7:
            assert "top_p" in record["error"] and record["finish_reason"] == "error"
        else:
            assert record["text"] == expected_text(f"line {i}", n)
            assert record["generated_tokens"] == n and record["finish_reason"] == "length"
    assert status.tokens == sum(r["generated_tokens"] for r in out)
    # nothing left behind: entries acked and deleted, bulk response streams dropped
    assert harness.redis.xlen(harness.keys.bulk) == 0
    assert harness.redis.xpending(harness.keys.bulk, WORKER_GROUP)["pending"] == 0
    assert not harness.redis.keys(harness.keys.response("*"))


def test_a_model_without_a_chat_template_refuses_chat_lines_only(harness):
    harness.start(FakeEngine())
    bulk = BulkJobs(harness.client())
    lines = [json.dumps({"messages": CHAT}), json.dumps({"prompt": "fine"})]
    bulk.submit(read_input(lines), job_id="nochat", params={"max_new_tokens": 2})
    bulk.wait("nochat", timeout_s=10, poll_s=0.01)
    first, second = bulk.results("nochat")
    assert "no chat template" in first["error"] and second["text"] == expected_text("fine", 2)


def test_interactive_requests_go_before_queued_bulk_lines():
    harness = Harness(admit_batch=4)
    engine = FakeEngine()
    loop = harness.loop(engine)
    loop.setup()
    try:
        bulk = BulkJobs(harness.client())
        lines = [json.dumps({"prompt": f"bulk {i}"}) for i in range(40)]
        bulk.submit(read_input(lines), job_id="prio", params={"max_new_tokens": 50})
        loop.iterate()
        loop.iterate()
        assert 0 < len(engine.added) < 40  # bulk work under way, more of it queued
        client = harness.client()
        requests = client.submit(["interactive"], max_new_tokens=2)
        before = len(engine.added)
        loop.iterate()
        assert engine.added[before:] == [requests.requests[0].rid]  # and no bulk line
        assert harness.redis.xlen(harness.keys.bulk) > 40 - len(engine.added)
    finally:
        loop.publisher.stop()


def _output(rid: str, index: int, text: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(
        request_id=rid,
        token_ids=(ord(text),),
        text=text,
        first_token_index=index,
        prompt_length=2,
        generated_length=index + 1,
        finished=finished,
        finish_reason=Reason.LENGTH if finished else None,
    )


def test_a_taken_over_line_records_the_text_its_first_worker_published(harness):
    bulk = BulkJobs(harness.client())
    bulk.submit(read_input(['{"prompt": "ab"}', '{"prompt": "cd"}']), job_id="tk")
    job = harness.keys.job("tk")
    entries = [
        Entry(harness.keys.bulk, harness.redis.hget(job.submitted, n).decode()) for n in (0, 1)
    ]
    for rid in ("tk-0", "tk-1"):  # a dead worker published three tokens of each line
        for i, char in enumerate("abc"):
            payload = wire.chunk_payload(i=i, ids=[ord(char)], text=char, plen=2, glen=i + 1)
            harness.redis.xadd(harness.keys.response(rid), {wire.PAYLOAD: payload})
    publisher = Publisher(harness.connection(), harness.keys, "w:2", ttl_s=60)
    publisher.start()
    tagged = [
        Entry(e.stream, e.entry_id, 2, JobLine("tk", n, f"tk-{n}")) for n, e in enumerate(entries)
    ]
    routes = {"tk-0": tagged[0]}  # the loop names each output's entry
    publisher.put(Batch(outputs=[_output("tk-0", 3, "d")], entries=routes))
    last = _output("tk-0", 4, "e", finished=True)
    publisher.put(Batch(outputs=[last], entries=routes, acks=[tagged[0]]))
    cancelled = Ending("tk-1", Reason.CANCELLED, plen=2, glen=3, entry=tagged[1])  # no step
    publisher.put(Batch(endings=[cancelled], acks=[tagged[1]]))
    assert publisher.flush(5)
    publisher.stop()
    first, second = bulk.results("tk")
    assert (first["text"], first["generated_tokens"], first["finish_reason"]) == (
        "abcde",
        5,
        "length",
    )
    assert (second["text"], second["finish_reason"]) == ("abc", "cancelled")
    # a bulk line publishes no chunk: only the three the first worker left are there
    assert [harness.redis.xlen(harness.keys.response(r)) for r in ("tk-0", "tk-1")] == [3, 3]
    assert harness.redis.xlen(harness.keys.bulk) == 0


def test_cancel_a_running_job_ends_every_line(harness):
    engine = FakeEngine(max_num_seqs=4, step_delay_s=0.002)  # four lines at a time
    harness.start(engine)
    bulk = BulkJobs(harness.client())
    lines = [json.dumps({"prompt": f"long {i}"}) for i in range(60)]
    bulk.submit(read_input(lines), job_id="cx", params={"max_new_tokens": 10})
    wait_for(lambda: bulk.status("cx").done >= 5, what="some lines done")
    bulk.cancel("cx")
    status = bulk.wait("cx", timeout_s=10, poll_s=0.01)
    assert status.done == 60 and status.state.value == "cancelled"
    out = list(bulk.results("cx"))
    reasons = {r["finish_reason"] for r in out}
    assert reasons == {"length", "cancelled"}
    for i, record in enumerate(out):  # cancelled mid-generation: a prefix of the whole text
        assert expected_text(f"long {i}", 10).startswith(record["text"])
    wait_for(lambda: not engine.requests, what="engine empty")
    assert harness.redis.xlen(harness.keys.bulk) == 0


def test_a_dead_lettered_line_is_that_lines_error(harness):
    bulk = BulkJobs(harness.client())
    lines = ['{"prompt": "kills workers"}', '{"prompt": "fine"}']
    bulk.submit(read_input(lines), job_id="dl", params={"max_new_tokens": 3})
    for stream in harness.keys.request_streams():
        harness.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    reply = harness.redis.xreadgroup(WORKER_GROUP, "dead:1", {harness.keys.bulk: ">"}, count=1)
    entry_id = reply[0][1][0][0]
    for n in (2, 3):  # two more workers took it over and died too
        harness.redis.xclaim(harness.keys.bulk, WORKER_GROUP, f"dead:{n}", 0, [entry_id])
    time.sleep(harness.settings.reclaim_idle_s)
    harness.start(FakeEngine())
    assert bulk.wait("dl", timeout_s=10, poll_s=0.01).errors == 1
    first, second = bulk.results("dl")
    assert "dead-lettered" in first["error"] and second["text"] == expected_text("fine", 3)
