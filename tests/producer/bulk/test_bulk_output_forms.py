"""A bulk job's output beyond text: OpenAI lines that ask for logprobs get them, each line
keeps its input's form in a mixed job, and the progress bar counts tokens as workers
generate them (the job's `streamed` counter), not only as lines end."""

from __future__ import annotations

import dataclasses
import io
import json

import fakeredis
import pytest

from mii.broker_config import jobs
from mii.broker_config.keys import DeploymentKeys
from mii.constants import GenerationFinishReason as Reason
from mii.engine.outputs import RequestOutput, TokenLogprob
from mii.producer.bulk.input import CHAT, COMPLETIONS
from mii.producer.bulk.jobs import BulkJobs, read_input
from mii.producer.bulk.progress import ProgressBar
from mii.worker.bulk_progress import LogprobLog, streamed_commands, streamed_tokens

pytestmark = pytest.mark.timeout(20)
GREEDY = {"max_new_tokens": 4, "do_sample": False}


def _openai(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _record(redis, job_keys, line: int, text: str, glen: int, **extra) -> None:
    payload = jobs.result_payload(Reason.LENGTH, text=text, glen=glen, plen=2, **extra)
    keys = job_keys.all()
    redis.eval(jobs.RECORD_SCRIPT, len(keys), *keys, 1.0, line, payload, glen, 0)


class ByteTokenizer:
    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(96 + i) for i in ids)


def _logprob_fields() -> dict:
    log = LogprobLog(ByteTokenizer())
    for index, token in enumerate((1, 2)):
        lp = TokenLogprob(token, -0.5 * (index + 1), ((token, -0.5), (3, -2.0)))
        log.add(RequestOutput("r", (token,), "x", index, 2, index + 1, logprobs=(lp,)))
    log.add(RequestOutput("plain", (1,), "x", 0, 2, 1))  # asked for none
    assert log.pop("plain") == {}
    return log.pop("r")


def test_openai_lines_that_ask_get_logprobs_in_both_forms(harness):
    bulk = BulkJobs(harness.client())
    lines = [
        _openai("c", COMPLETIONS, {"prompt": "p", "max_tokens": 2, "logprobs": 1}),
        _openai(
            "chat",
            CHAT,
            {
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 2,
                "logprobs": True,
                "top_logprobs": 1,
            },
        ),  # fmt: skip
        _openai("none", COMPLETIONS, {"prompt": "p", "max_tokens": 2}),
    ]
    bulk.submit(read_input(lines), job_id="lp", params=GREEDY)
    keys = harness.keys.job("lp")
    fields = _logprob_fields()
    assert fields["toks"] == ["a", "b"] and fields["top"][0] == [(1, -0.5, "a"), (3, -2.0, "c")]
    for line in range(3):
        _record(harness.redis, keys, line, "ab", 2, **fields)
    c, chat, none = bulk.results("lp")
    assert c["response"]["body"]["choices"][0]["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -1.0],
        "top_logprobs": [{"a": -0.5}, {"b": -0.5}],
        "text_offset": [0, 1],
    }
    content = chat["response"]["body"]["choices"][0]["logprobs"]["content"]
    top = [{"token": "b", "logprob": -0.5, "bytes": [98]}]
    assert content[1] == {"token": "b", "logprob": -1.0, "bytes": [98], "top_logprobs": top}
    assert none["response"]["body"]["choices"][0]["logprobs"] is None  # not asked


def test_a_mixed_job_writes_each_line_in_its_own_form(harness):
    bulk = BulkJobs(harness.client())
    lines = [
        json.dumps({"prompt": "p", "id": "mine"}),
        _openai("theirs", COMPLETIONS, {"prompt": "q"}),
    ]
    status = bulk.submit(read_input(lines), job_id="mix", params=GREEDY)
    assert status.format == "mii"
    for line in range(2):
        _record(harness.redis, harness.keys.job("mix"), line, "t", 1)
    mine, theirs = bulk.results("mix")
    assert set(mine) == {"id", "line", "text", "prompt_tokens", "generated_tokens", "finish_reason"}
    assert (
        theirs["custom_id"] == "theirs" and theirs["response"]["body"]["choices"][0]["text"] == "t"
    )


def test_streamed_tokens_reach_the_job_and_its_progress_bar(harness):
    bulk = BulkJobs(harness.client())
    bulk.submit(read_input([json.dumps({"prompt": f"p{i}"}) for i in range(4)]), job_id="st",
                params=GREEDY)  # fmt: skip
    outputs = [RequestOutput("st-0", (5, 6), "", 0, 2, 2), RequestOutput("st-1", (7,), "", 0, 2, 1),
               RequestOutput("interactive", (8,), "", 0, 2, 1)]  # fmt: skip
    tokens = streamed_tokens(outputs, lambda rid: rid.split("-")[0] if "-" in rid else None)
    assert tokens == {"st": 3}
    pipe = harness.redis.pipeline()
    for name, *args in streamed_commands(harness.keys, tokens | {"gone": 4}):
        getattr(pipe, name)(*args)
    pipe.execute()
    assert not harness.redis.exists(harness.keys.job("gone").meta)  # an expired job stays gone
    status = bulk.status("st")
    assert (status.done, status.tokens, status.streamed, status.tokens_so_far) == (0, 0, 3, 3)
    clock, out = [0.0], io.StringIO()
    bar = ProgressBar("st", stream=out, clock=lambda: clock[0], every_s=0.0)
    bar.update(dataclasses.replace(status, streamed=0))
    clock[0] = 2.0
    bar.update(dataclasses.replace(status, streamed=300))  # no line ended yet
    assert "0/4 lines 0.0 req/s 150 tok/s" in out.getvalue().splitlines()[-1]


def test_logprob_results_round_trip():
    payload = jobs.result_payload(Reason.STOP, text="ab", glen=2, **_logprob_fields())
    result = jobs.decode_result(payload)
    assert result.ids == [1, 2] and result.lp == [-0.5, -1.0] and result.toks == ["a", "b"]
    assert jobs.decode_result(jobs.result_payload(Reason.STOP, text="x")).lp is None


def test_streamed_script_needs_no_job_keys_beyond_its_meta():
    redis = fakeredis.FakeRedis()
    meta = DeploymentKeys("d").job("j").meta
    redis.hset(meta, "total", 1)
    redis.eval(jobs.STREAMED_SCRIPT, 1, meta, 5)
    redis.eval(jobs.STREAMED_SCRIPT, 1, meta, 2)
    assert int(redis.hget(meta, "streamed")) == 7
