"""Asynchronous scheduling (step N+1 launched before step N's samples are read) changes no
output: the same tokens as the synchronous engine, greedy and seeded, through chunked
prompts, preemption, prefix-cache hits, stops and aborts, with no block left behind.

It is the default on CUDA only; here it is forced on for the CPU, where every code path
runs the same (the device tensors are CPU tensors)."""

from __future__ import annotations

import pytest
from tiny_models import mixed_prompts

import mii
from mii.engine import step_plan
from mii.engine.sampling_params import SamplingParams


def run(path: str, prompts, async_scheduling: bool, pipe_kw=None, **params):
    pipe = mii.pipeline(path, async_scheduling=async_scheduling, **(pipe_kw or {}))
    try:
        return [r.token_ids for r in pipe(prompts, **params)], pipe.engine.stats()
    finally:
        pipe.destroy()


@pytest.fixture
def pending_rows(monkeypatch):
    """Counts the input tokens that came from the device (PENDING when scheduled)."""
    seen = {"rows": 0}
    build = step_plan.StepPlan.build.__func__

    def counting(cls, chunks, block_size, sample_rows=None, **options):
        plan = build(cls, chunks, block_size, sample_rows, **options)
        seen["rows"] += len(plan.pending_rows)
        return plan

    monkeypatch.setattr(step_plan.StepPlan, "build", classmethod(counting))
    return seen


@pytest.mark.parametrize("arch", ["llama3", "opt"])
def test_greedy_tokens_equal_the_synchronous_engine(tiny_model, arch, pending_rows):
    path = tiny_model(arch)
    prompts = mixed_prompts(6, (1, 17, 70, 5, 33, 2), seed=5)
    opts = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    kw = dict(max_num_batched_tokens=32)
    expected, _ = run(path, prompts, False, kw, **opts)
    assert pending_rows["rows"] == 0
    got, stats = run(path, prompts, True, kw, **opts)
    assert got == expected
    # Nearly every decode took its input token from the step before, on the device.
    assert pending_rows["rows"] >= 6 * 18
    assert stats.tokens_generated == 6 * 20  # surplus samples of finished requests dropped


def test_seeded_sampling_and_varied_lengths_equal_the_synchronous_engine(tiny_model):
    path = tiny_model("qwen2")
    prompts = mixed_prompts(5, (3, 40, 9), seed=8)
    opts = dict(do_sample=True, temperature=0.8, top_p=0.9, seed=1234, max_new_tokens=17)
    assert run(path, prompts, True, **opts)[0] == run(path, prompts, False, **opts)[0]


def test_preemption_and_prefix_hits_keep_tokens_and_free_every_block(tiny_model):
    path = tiny_model("llama3")
    shared = mixed_prompts(1, (32,), seed=3)[0]
    prompts = [shared + tail for tail in mixed_prompts(6, (8, 25, 16), seed=7)]
    kw = dict(num_kv_blocks=12, max_num_batched_tokens=64)  # too small: preemptions
    opts = dict(max_new_tokens=30, min_new_tokens=30, do_sample=False)
    expected, _ = run(path, prompts, False, kw, **opts)
    pipe = mii.pipeline(path, async_scheduling=True, **kw)
    assert [r.token_ids for r in pipe(prompts, **opts)] == expected
    bm = pipe.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    pipe.destroy()


def test_stop_tokens_end_requests_at_the_same_token(tiny_model):
    path = tiny_model("llama")
    prompts = mixed_prompts(4, (6, 30), seed=2)
    free_run, _ = run(path, prompts, False, max_new_tokens=24, do_sample=False)
    stop = free_run[0][5]  # a token the first request generates: it stops there
    opts = dict(max_new_tokens=24, do_sample=False, stop_token_ids=[stop])
    expected, _ = run(path, prompts, False, **opts)
    assert len(expected[0]) <= 6 and expected[0][-1] == stop
    assert run(path, prompts, True, **opts)[0] == expected


def test_abort_while_a_step_runs_frees_blocks_and_reports_nothing_more(tiny_model):
    pipe = mii.pipeline(tiny_model("mistral"), async_scheduling=True)
    engine = pipe.engine
    params = SamplingParams(max_new_tokens=40, min_new_tokens=40)
    for i, prompt in enumerate(mixed_prompts(3, (12, 20, 7), seed=4)):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(4):
        engine.step()
    assert engine._inflight is not None  # a step is launched and unread
    assert engine.abort_request("r1")
    outputs = []
    while engine.has_unfinished_requests():
        outputs += engine.step()
    assert {o.request_id for o in outputs} == {"r0", "r2"}
    counts = {
        rid: sum(len(o.token_ids) for o in outputs if o.request_id == rid) for rid in ["r0", "r2"]
    }
    assert all(0 < n <= 40 for n in counts.values())
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks
    pipe.destroy()


def test_a_repetition_penalty_request_runs_synchronously_beside_others(tiny_model, pending_rows):
    path = tiny_model("llama3")
    prompts = mixed_prompts(3, (10, 4), seed=6)
    opts = dict(max_new_tokens=12, do_sample=False, repetition_penalty=1.3)
    got, _ = run(path, prompts, True, **opts)
    assert pending_rows["rows"] == 0  # the penalty needs every token on the host
    assert got == run(path, prompts, False, **opts)[0]
