"""One `MIIPipeline` called from several threads: every call gets its own answers (the same
as alone: greedy decoding does not depend on what else runs), served by shared steps."""

from __future__ import annotations

import threading

import pytest

import mii

pytestmark = pytest.mark.timeout(180)
GREEDY = dict(max_new_tokens=12, do_sample=False)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return mii.pipeline(tiny_model("llama"), max_num_batched_tokens=64)


def test_calls_from_threads_get_their_own_answers(pipe):
    prompts = [[f"thread {t} prompt {i}" for i in range(3)] for t in range(4)]
    alone = [[r.token_ids for r in pipe(p, **GREEDY)] for p in prompts]
    results: dict[int, object] = {}

    def call(t: int) -> None:
        try:
            results[t] = [r.token_ids for r in pipe(prompts[t], **GREEDY)]
        except Exception as exc:  # reported by the assertion below
            results[t] = exc

    threads = [threading.Thread(target=call, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert [results[t] for t in range(4)] == alone
    assert not pipe.engine.has_unfinished_requests()


def test_a_stream_and_a_call_share_the_engine(pipe):
    alone_stream = "".join(d.generated_text for d in pipe.stream("streamed", **GREEDY))
    alone_call = pipe(["called"], **GREEDY)[0].generated_text
    got: dict[str, str] = {}
    thread = threading.Thread(
        target=lambda: got.update(call=pipe(["called"], **GREEDY)[0].generated_text)
    )
    thread.start()
    got["stream"] = "".join(d.generated_text for d in pipe.stream("streamed", **GREEDY))
    thread.join(120)
    assert got == {"stream": alone_stream, "call": alone_call}
