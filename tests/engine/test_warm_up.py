"""The start-up warm-up (`LLMEngine.warm_up`): it runs the step shapes it promises and leaves
the engine as built: no request, no cached prefix, counters at zero, the same tokens after.

It is on by default on CUDA only; here it is forced on for the CPU, where the engine runs
the same steps (the kernels it exists to compile are the GPU's)."""

from __future__ import annotations

import pytest
from tiny_models import greedy_tokens, mixed_prompts

from mii.engine import scheduler as scheduler_mod
from mii.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams

BUDGET = 64


def build(path: str, warm_up: bool | None, async_scheduling: bool = False) -> LLMEngine:
    config = EngineConfig(
        model=path, device="cpu", warm_up=warm_up, async_scheduling=async_scheduling,
        scheduler=SchedulerConfig(max_num_batched_tokens=BUDGET, max_num_seqs=8),
        cache=CacheConfig(num_blocks=64),
    )  # fmt: skip
    return LLMEngine(config)


@pytest.fixture
def step_shapes(monkeypatch):
    """Each scheduled step as (prompt tokens, decodes), recorded at the scheduler."""
    shapes = []
    schedule = scheduler_mod.Scheduler.schedule

    def recorded(self):
        out = schedule(self)
        decodes = sum(1 for c in out.chunks if c.num_tokens == 1 and c.seq.num_generated > 0)
        if out.chunks:
            shapes.append((out.num_tokens - decodes, decodes))
        return out

    monkeypatch.setattr(scheduler_mod.Scheduler, "schedule", recorded)
    return shapes


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_warm_up_runs_its_shapes_and_leaves_the_engine_as_built(
    tiny_model, step_shapes, async_scheduling
):
    engine = build(tiny_model("llama3"), True, async_scheduling)
    prompts_alone = [(n, 0) for n in (1, 3, 16, 17, 40)]
    assert all(shape in step_shapes for shape in prompts_alone), step_shapes
    # prompt chunks beside a running decode, up to the whole budget
    assert any(p > 0 and d > 0 for p, d in step_shapes), step_shapes
    assert max(p + d for p, d in step_shapes) == BUDGET
    stats = engine.stats()
    assert (stats.steps, stats.tokens_generated, stats.prompt_tokens_processed) == (0, 0, 0)
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting
    assert stats.kv_blocks_free == stats.kv_blocks_total
    assert not engine.block_manager.hash_to_block
    assert all(b.block_hash is None for b in engine.block_manager.blocks)
    assert engine._inflight is None


def test_tokens_after_a_warm_up_equal_a_cold_engine(tiny_model):
    path = tiny_model("qwen2")
    prompts = mixed_prompts(4, (5, 33, 2, 17), seed=3)
    cold = greedy_tokens(build(path, False), prompts, 12)
    assert greedy_tokens(build(path, True), prompts, 12) == cold


def test_off_on_the_cpu_unless_asked(tiny_model, step_shapes):
    engine = build(tiny_model("llama3"), None)
    assert step_shapes == [] and engine.stats().kv_blocks_free == engine.stats().kv_blocks_total


def test_an_engine_with_requests_is_refused(tiny_model):
    engine = build(tiny_model("llama3"), False)
    engine.add_request("r", [1, 2, 3], SamplingParams(max_new_tokens=2))
    with pytest.raises(RuntimeError, match="without requests"):
        engine.warm_up()
    assert list(engine.requests) == ["r"]


@pytest.mark.timeout(60)
def test_tensor_parallel_ranks_warm_up_in_step(tiny_model, step_shapes):
    """With tensor_parallel=2 the warm-up's steps run on both ranks (asked through the
    pipeline's option); afterwards the calls' tokens and step count equal a single
    process's without a warm-up."""
    import mii

    path = tiny_model("llama3")
    prompts = mixed_prompts(3, (1, 17, 40), seed=4)
    greedy = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    results = []
    for options in (dict(warm_up=False), dict(warm_up=True, tensor_parallel=2)):
        step_shapes.clear()
        pipe = mii.pipeline(path, max_num_batched_tokens=BUDGET, **options)
        try:
            warmed = list(step_shapes)
            tokens = [r.token_ids for r in pipe(prompts, **greedy)]
            results.append((tokens, pipe.engine.stats().steps))
        finally:
            pipe.destroy()
        assert bool(warmed) == options["warm_up"]
    assert (40, 0) in warmed and results[1] == results[0]
