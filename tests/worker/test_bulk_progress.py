"""Bulk lines through a real `WorkerLoop` on fakeredis: the job's `streamed` counter grows
with each step's tokens while lines run (what the progress bar reads), and OpenAI lines
that ask for logprobs get them in the job's output; interactive requests count nowhere."""

from __future__ import annotations

import dataclasses
import json

import pytest
from bulk_engine import CountingEngine
from fake_engine import FakeEngine
from harness import wait_for

from mii.engine.outputs import RequestOutput, TokenLogprob
from mii.producer.bulk.input import CHAT, COMPLETIONS
from mii.producer.bulk.jobs import BulkJobs, read_input

pytestmark = pytest.mark.timeout(30)


class LogprobEngine(CountingEngine):
    """The fake engine, with a log-probability for each token of requests that ask."""

    def _advance(self, rid, req) -> RequestOutput:
        out = super()._advance(rid, req)
        if req.params.logprobs is None:
            return out
        token = out.token_ids[0]
        lp = TokenLogprob(token, -0.25, ((token, -0.25), (token + 1, -3.0)))
        return dataclasses.replace(out, logprobs=(lp,))


def _openai(custom_id: str, url: str, body: dict) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_openai_lines_get_the_logprobs_their_worker_computed(harness):
    harness.start(LogprobEngine())
    bulk = BulkJobs(harness.client())
    lines = [
        _openai("c", COMPLETIONS, {"prompt": "ab", "max_tokens": 3, "logprobs": 1}),
        _openai(
            "chat",
            CHAT,
            {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True},
        ),  # fmt: skip
        _openai("plain", COMPLETIONS, {"prompt": "ab", "max_tokens": 3}),
    ]
    bulk.submit(read_input(lines), job_id="lpw")
    status = bulk.wait("lpw", timeout_s=10, poll_s=0.01)
    c, chat, plain = bulk.results("lpw")
    logprobs = c["response"]["body"]["choices"][0]["logprobs"]
    text = c["response"]["body"]["choices"][0]["text"]
    assert logprobs["token_logprobs"] == [-0.25] * 3 and "".join(logprobs["tokens"]) == text
    assert [list(top.values()) for top in logprobs["top_logprobs"]] == [[-0.25]] * 3
    content = chat["response"]["body"]["choices"][0]["logprobs"]["content"]
    assert [t["logprob"] for t in content] == [-0.25, -0.25] and content[0]["top_logprobs"] == []
    assert plain["response"]["body"]["choices"][0]["logprobs"] is None
    assert status.streamed == status.tokens == 8  # every token counted once as it came


def test_streamed_tokens_grow_before_lines_end(harness):
    harness.start(FakeEngine(step_delay_s=0.02))
    bulk = BulkJobs(harness.client())
    lines = [json.dumps({"prompt": f"p{i}", "params": {"max_new_tokens": 40}}) for i in range(3)]
    bulk.submit(read_input(lines), job_id="grow")
    wait_for(lambda: bulk.status("grow").streamed >= 30, 10, "tokens to stream")
    running = bulk.status("grow")
    assert running.done == 0 and running.tokens == 0 and running.tokens_so_far >= 30
    harness.client().generate("interactive", max_new_tokens=5)  # not the job's
    final = bulk.wait("grow", timeout_s=10, poll_s=0.01)
    assert final.done == 3 and final.streamed == final.tokens == 120
