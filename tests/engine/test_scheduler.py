"""SplitFuse scheduling over plain sequences: budget, order, chunking, preemption."""

from __future__ import annotations

import numpy as np
import pytest

from mii.engine.block_manager import BlockManager
from mii.engine.config import SchedulePolicy, SchedulerConfig
from mii.engine.sampling_params import SamplingParams
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence, SequenceStatus
from mii.engine.step_plan import StepPlan


def make(budget=16, blocks=64, bs=4, max_seqs=8, policy=SchedulePolicy.SPLITFUSE):
    cfg = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs, policy=policy)
    return Scheduler(cfg, BlockManager(blocks, bs, enable_prefix_caching=False))


_arrival = iter(range(10**6))


def add(sched: Scheduler, n_tokens: int, rid: str) -> Sequence:
    s = Sequence(
        rid, list(range(1, n_tokens + 1)), SamplingParams(max_new_tokens=100), next(_arrival)
    )
    sched.add(s)
    return s


def run_step(sched: Scheduler):
    """Schedule, then act as the model: computed tokens advance, samples append a token."""
    out = sched.schedule()
    sched.finish_step(out)
    for c in out.chunks:
        if c.samples:
            c.seq.append_token(7)
    return out


def test_long_prompt_is_split_into_budget_sized_chunks():
    sched = make(budget=16)
    s = add(sched, 40, "long")
    sizes = [run_step(sched).num_tokens for _ in range(3)]
    assert sizes == [16, 16, 8]
    assert s.num_generated == 1  # only the chunk that reached the end sampled


def test_short_prompts_share_one_step():
    sched = make(budget=16)
    for i in range(3):
        add(sched, 5, f"s{i}")
    out = run_step(sched)
    assert [c.num_tokens for c in out.chunks] == [5, 5, 5]
    assert all(c.samples for c in out.chunks)


def test_decodes_go_first_then_prompt_chunks_fill_the_budget():
    sched = make(budget=16)
    a, b = add(sched, 3, "a"), add(sched, 3, "b")
    run_step(sched)
    c = add(sched, 50, "c")
    out = run_step(sched)
    assert [(x.seq, x.num_tokens) for x in out.chunks] == [(a, 1), (b, 1), (c, 14)]
    assert out.num_tokens == 16
    # the step's plan knows its leading decodes: the CUDA path attends over them apart
    plan = StepPlan.build(out.chunks, block_size=4)
    assert plan.num_decodes == 2 and plan.max_query_len == 14


@pytest.mark.parametrize(
    ("q_lens", "decodes"),
    [([1, 1, 14], 2), ([14, 1, 1], 0), ([1, 1, 1], 3), ([3], 0), ([1, 5, 1], 1)],
)
def test_step_plan_counts_its_leading_one_token_sequences(q_lens, decodes):
    starts = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    plan = StepPlan(*(np.zeros(0, dtype=np.int64),) * 3, np.zeros((len(q_lens), 1), np.int32),
                    starts, np.array(q_lens, np.int32), np.zeros(0, np.int64))  # fmt: skip
    assert plan.num_decodes == decodes


@pytest.mark.parametrize("budget", [1, 7, 16, 33])
def test_the_budget_always_holds(budget):
    sched = make(budget=budget, blocks=400)
    for i, n in enumerate([3, 70, 12, 33, 1, 90]):
        add(sched, n, f"r{i}")
    for _ in range(60):
        out = run_step(sched)
        assert 0 < out.num_tokens <= budget


def test_max_num_seqs_bounds_the_running_set():
    sched = make(budget=64, max_seqs=2)
    for i in range(4):
        add(sched, 4, f"r{i}")
    run_step(sched)
    assert len(sched.running) == 2 and len(sched.waiting) == 2


def test_preemption_frees_the_newest_request_and_requeues_it_first():
    sched = make(budget=32, blocks=4, bs=4)
    old = add(sched, 7, "old")
    new = add(sched, 7, "new")
    run_step(sched)  # both prompts in: 2 blocks each, the cache is full
    for _ in range(2):
        run_step(sched)  # old's 9th token needs a fifth block: new is preempted
    assert new.status == SequenceStatus.WAITING and sched.waiting[0] is new
    assert new.block_table == [] and new.num_computed_tokens == 0
    assert old.status == SequenceStatus.RUNNING
    assert new.num_generated >= 1  # its generated tokens are kept and recomputed later


def test_prefill_first_runs_waiting_prompts_before_decodes():
    sched = make(budget=16, policy=SchedulePolicy.PREFILL_FIRST)
    a = add(sched, 3, "a")
    run_step(sched)
    b = add(sched, 10, "b")
    out = run_step(sched)
    assert [x.seq for x in out.chunks] == [b]
    out = run_step(sched)
    assert {x.seq for x in out.chunks} == {a, b}


def test_no_blocks_leak_after_every_request_finishes_or_is_aborted():
    sched = make(budget=8, blocks=30)
    seqs = [add(sched, n, f"r{i}") for i, n in enumerate([5, 17, 9, 30])]
    for _ in range(6):
        run_step(sched)
    sched.remove(seqs[1])  # aborted mid-prompt
    for s in seqs:
        if s.status != SequenceStatus.FINISHED:
            sched.remove(s)
    assert sched.block_manager.num_free_blocks == 30
    assert not sched.has_unfinished()


def test_longrope_sequences_recompute_their_cache_once_they_outgrow_it():
    """Phi-3's LongRoPE turns every position of a sequence longer than its pretraining
    length with other factors: the cache is computed again when a sequence crosses it."""
    cfg = SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=8)
    sched = Scheduler(cfg, BlockManager(64, 4, enable_prefix_caching=False), recompute_at=12)
    short, long = add(sched, 10, "short"), add(sched, 14, "long")
    chunks, long_starts = [], []  # (start, tokens of short when scheduled) of short's chunks
    for _ in range(10):
        out = sched.schedule()
        chunks += [(c.start, c.seq.num_tokens) for c in out.chunks if c.seq is short]
        long_starts += [c.start for c in out.chunks if c.seq is long]
        sched.finish_step(out)
        for c in out.chunks:
            if c.samples:
                c.seq.append_token(7)
    restarts = [tokens for start, tokens in chunks if start == 0]
    assert restarts == [10, 13]  # its prompt, then again once it holds 13 tokens
    assert short.num_tokens > 14 and long.num_tokens > 16
    assert long_starts.count(0) == 1  # a long prompt is computed long from the start
