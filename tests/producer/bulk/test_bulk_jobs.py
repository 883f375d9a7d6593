"""A bulk job's bookkeeping on fakeredis: creating and resubmitting a job, the depth limit,
recording results (first one wins), cancelling, output order and forms, progress."""

from __future__ import annotations

import io
import json

import pytest

from mii.broker_config import jobs, wire
from mii.broker_config.keys import WORKER_GROUP
from mii.constants import GenerationFinishReason as Reason
from mii.errors import InvalidRequestError, MIIError
from mii.producer.bulk.input import CHAT, COMPLETIONS
from mii.producer.bulk.jobs import BulkJobs, JobIncompleteError, line_seed, read_input
from mii.producer.bulk.progress import ProgressBar
from mii.producer.bulk.store import JobNotFoundError, JobState

pytestmark = pytest.mark.timeout(20)
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _lines(n: int, bad_at: tuple[int, ...] = ()) -> list[str]:
    lines = [json.dumps({"prompt": f"prompt {i}", "id": f"q{i}"}) for i in range(n)]
    for i in bad_at:
        lines[i] = '{"prompt": '
    return lines


def _record(redis, job_keys, line: int, text: str, glen: int = 3, **extra) -> int:
    payload = jobs.result_payload(extra.pop("reason", Reason.LENGTH), text=text, glen=glen, **extra)
    keys = job_keys.all()
    error = 1 if extra.get("error") else 0
    return redis.eval(jobs.RECORD_SCRIPT, len(keys), *keys, 1.0, line, payload, glen, error)


@pytest.fixture
def bulk(harness):
    return BulkJobs(harness.client())


def test_submit_queues_each_line_once_and_a_resubmit_queues_nothing(harness, bulk):
    job_input = read_input(_lines(6, bad_at=(2,)))
    status = bulk.submit(job_input, job_id="j1", params=GREEDY)
    assert (status.total, status.submitted, status.done, status.errors) == (6, 6, 1, 1)
    entries = harness.redis.xrange(harness.keys.bulk)
    messages = [wire.decode_request(f) for _, f in entries]
    assert [m.rid for m in messages] == ["j1-0", "j1-1", "j1-3", "j1-4", "j1-5"]
    assert messages[0].job == "j1" and messages[0].line == 0 and messages[0].params == GREEDY
    assert msgpack_version(entries[0][1]) == 2  # job lines, no reply stream: version 2
    again = bulk.submit(job_input, job_id="j1", params=GREEDY)
    assert harness.redis.xlen(harness.keys.bulk) == 5 and again.submitted == 6
    assert again.state == JobState.RUNNING


def msgpack_version(fields) -> int:
    import msgpack

    return msgpack.unpackb(fields[wire.PAYLOAD])["v"]


def test_a_line_over_the_byte_limit_is_that_lines_error(harness, bulk):
    big = "x" * (bulk.client.max_request_bytes + 1)
    job = read_input([json.dumps({"prompt": "small"}), json.dumps({"prompt": big})])
    status = bulk.submit(job, params=GREEDY)
    assert (status.submitted, status.errors) == (2, 1)
    assert harness.redis.xlen(harness.keys.bulk) == 1
    (error,) = list(bulk.results(status.job_id, partial=True))  # the only finished line
    assert "over this deployment's limit" in json.dumps(error)


def test_job_id_comes_from_input_and_options_and_clashes_are_refused(bulk):
    first = bulk.submit(read_input(_lines(2)), params=GREEDY)
    assert first.job_id == bulk.submit(read_input(_lines(2)), params=GREEDY).job_id
    assert first.job_id != bulk.submit(read_input(_lines(2)), params={"max_new_tokens": 5}).job_id
    with pytest.raises(InvalidRequestError, match="another input"):
        bulk.submit(read_input(_lines(3)), job_id=first.job_id, params=GREEDY)
    with pytest.raises(ValueError, match="job id"):
        bulk.submit(read_input(_lines(1)), job_id="no spaces please")
    with pytest.raises(JobNotFoundError):
        bulk.status("never-submitted")


def test_sampled_lines_get_a_seed_fixed_by_job_and_line(harness, bulk):
    bulk.submit(read_input(_lines(2)), job_id="seeded", params={"do_sample": True})
    seeds = [
        wire.decode_request(f).params["seed"] for _, f in harness.redis.xrange(harness.keys.bulk)
    ]
    assert seeds == [line_seed("seeded", 0), line_seed("seeded", 1)]


def test_submit_stops_at_the_depth_limit_and_goes_on_where_it_stopped(harness, bulk):
    bulk.submit(read_input(_lines(1)), job_id="j2", params=GREEDY)  # creates the job
    items = [bulk._item("j2", line, GREEDY) for line in read_input(_lines(5)).lines]
    assert bulk.store.submit("j2", items, limit=3) == 3  # 1 already queued + 2 more
    assert harness.redis.xlen(harness.keys.bulk) == 3
    assert bulk.store.submit("j2", items, limit=3) == 3  # through the queued ones, no more
    assert bulk.store.submit("j2", items, limit=None) == 5
    assert harness.redis.xlen(harness.keys.bulk) == 5


def test_a_worker_under_a_depth_limit_drains_a_larger_job():
    from harness import Harness

    limited = Harness(deployment="limited", max_bulk_depth=4)
    limited.start()
    try:
        bulk = BulkJobs(limited.client())
        status = bulk.submit(read_input(_lines(30)), job_id="big", params=GREEDY)
        assert status.submitted == 30
        assert bulk.wait("big", timeout_s=10, poll_s=0.01).done == 30
    finally:
        limited.stop()


def test_first_result_wins_and_every_write_refreshes_the_ttl(harness, bulk):
    bulk.submit(read_input(_lines(2)), job_id="j3", params=GREEDY, ttl_s=500)
    keys = harness.keys.job("j3")
    assert _record(harness.redis, keys, 0, "abc") == 1
    assert _record(harness.redis, keys, 0, "xyz") == 0  # a second run of a line
    status = bulk.status("j3")
    assert (status.done, status.tokens, status.finished) == (1, 3, None)
    assert _record(harness.redis, keys, 1, "d", glen=1, error="boom", etype="generation") == 1
    status = bulk.status("j3")
    assert (status.done, status.errors, status.finished, status.state) == (2, 1, 1.0, JobState.DONE)
    assert all(0 < harness.redis.ttl(k) <= 500 for k in keys.all())
    assert [r["text"] for r in bulk.results("j3")] == ["abc", "d"]
    assert bulk.cancel("j3").state == JobState.DONE  # nothing left to stop


def test_a_result_for_an_expired_job_writes_nothing(harness):
    keys = harness.keys.job("gone")
    assert _record(harness.redis, keys, 0, "late") == 0
    assert not any(harness.redis.exists(k) for k in keys.all())


def test_cancel_drops_queued_lines_and_cancels_those_a_worker_holds(harness, bulk):
    job_input = read_input(_lines(6))
    bulk.submit(job_input, job_id="j4", params=GREEDY)
    for stream in harness.keys.request_streams():
        harness.redis.xgroup_create(stream, WORKER_GROUP, id="0", mkstream=True)
    # a worker read lines 0 and 1; line 2 finished; line 5 was never queued (submitter died)
    harness.redis.xreadgroup(WORKER_GROUP, "w:1", {harness.keys.bulk: ">"}, count=2)
    job = harness.keys.job("j4")
    _record(harness.redis, job, 2, "done")
    for line in (2, 5):  # acked and deleted by a worker; never queued
        harness.redis.xdel(harness.keys.bulk, harness.redis.hget(job.submitted, line))
    harness.redis.hdel(job.submitted, 5)
    status = bulk.cancel("j4")
    assert status.done == 4 and status.state == JobState.CANCELLED
    left = [wire.decode_request(f).rid for _, f in harness.redis.xrange(harness.keys.bulk)]
    assert left == ["j4-0", "j4-1"]  # XDEL spares entries a worker holds
    assert harness.redis.exists(harness.keys.cancelled("j4-0"), harness.keys.cancelled("j4-1")) == 2
    control = [wire.decode_control(f).rid for _, f in harness.redis.xrange(harness.keys.control)]
    assert control == ["j4-0", "j4-1"]
    with pytest.raises(MIIError, match="cancelled"):
        bulk.submit(job_input, job_id="j4", params=GREEDY)
    partial = list(bulk.results("j4", partial=True))
    assert [(r["line"], r["finish_reason"]) for r in partial] == [
        (2, "length"),
        (3, "cancelled"),
        (4, "cancelled"),
        (5, "cancelled"),
    ]


def test_results_come_in_input_order_and_wait_for_the_whole_job(harness, bulk):
    bulk.submit(read_input(["", *_lines(4)]), job_id="j5", params=GREEDY)  # line 0 blank
    keys = harness.keys.job("j5")
    for line in (4, 2, 1):
        _record(harness.redis, keys, line, f"text {line}")
    with pytest.raises(JobIncompleteError, match="3 of 4"):
        list(bulk.results("j5"))
    _record(harness.redis, keys, 3, "text 3")
    out = io.StringIO()
    assert bulk.write_results("j5", out) == 4
    records = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(r["id"], r["line"], r["text"]) for r in records] == [
        (f"q{i - 1}", i, f"text {i}") for i in range(1, 5)
    ]
    assert set(records[0]) == {
        "id",
        "line",
        "text",
        "prompt_tokens",
        "generated_tokens",
        "finish_reason",
    }


def _openai(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_openai_batch_input_gets_openai_batch_output(harness, bulk):
    lines = [
        _openai("c0", COMPLETIONS, {"model": "m", "prompt": "2+2=", "max_tokens": 3}),
        _openai("c1", CHAT, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
        _openai("c2", COMPLETIONS, {"prompt": "x", "tools": [{}]}),  # refused
        _openai("c3", COMPLETIONS, {"prompt": "y"}),
    ]
    status = bulk.submit(read_input(lines), job_id="oa", params=GREEDY)
    assert status.format == "openai"
    keys = harness.keys.job("oa")
    _record(harness.redis, keys, 0, " 4", glen=2, reason=Reason.STOP, plen=4)
    _record(harness.redis, keys, 1, "Hello!", glen=2)
    _record(harness.redis, keys, 3, "", glen=0, reason=Reason.CANCELLED)
    c0, c1, c2, c3 = bulk.results("oa")
    assert c0["custom_id"] == "c0" and c0["id"] == "batch_req_oa-0" and c0["error"] is None
    body = c0["response"]["body"]
    assert c0["response"]["status_code"] == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["text"] == " 4" and body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert body["model"] == "fake"
    chat = c1["response"]["body"]
    assert chat["object"] == "chat.completion"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "Hello!"}
    assert c2["response"]["status_code"] == 400
    assert "tools" in c2["response"]["body"]["error"]["message"]
    assert c3["response"] is None and c3["error"]["code"] == "batch_cancelled"


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_shows_rates_and_eta(harness, bulk):
    bulk.submit(read_input(_lines(100)), job_id="pb", params=GREEDY)
    status = bulk.status("pb")
    clock, out = _Clock(), io.StringIO()
    bar = ProgressBar("pb", stream=out, clock=clock, every_s=5.0)
    bar.update(status)
    clock.now = 2.0
    bar.update(_replace(status, done=20, tokens=400))  # 10 lines/s, 200 tokens/s
    assert out.getvalue().count("\n") == 1  # not a terminal: at most a line every 5 s
    clock.now = 6.0
    bar.update(_replace(status, done=60, tokens=1200))
    last = out.getvalue().splitlines()[-1]
    assert "60/100 lines" in last and "10.0 req/s" in last and "200 tok/s" in last
    assert "ETA 0:00:04" in last and "[##############----------]" in last
    bar.close(_replace(status, done=100, tokens=2000))
    assert "ETA 0:00:00" in out.getvalue().splitlines()[-1]


def _replace(status, **fields):
    import dataclasses

    return dataclasses.replace(status, **fields)
