"""Greedy parity, token for token, with transformers' generate on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, mixed_prompts

import mii


def hf_greedy(path: str, prompts: list[list[int]], max_new_tokens: int, **kw) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            **kw,
        )
        outs.append(gen[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_models_match_transformers(tiny_model, arch):
    path = tiny_model(arch)
    # Budget 32: the 70- and 130-token prompts run as chunks over several steps, short ones
    # share steps with them and with decodes.
    pipe = mii.pipeline(path, max_num_batched_tokens=32)
    prompts = mixed_prompts(8, (1, 5, 17, 70, 33, 130, 2, 9), seed=hash(arch) % 1000)
    got = pipe(prompts, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    expected = hf_greedy(path, prompts, 24, min_new_tokens=24)
    assert [r.token_ids for r in got] == expected


@pytest.mark.parametrize("policy", ["splitfuse", "prefill_first"])
def test_preemption_under_a_small_cache_keeps_parity(tiny_model, policy):
    path = tiny_model("llama3")
    # 12 blocks of 16 tokens cannot hold six 40-token prompts growing by 30 tokens each:
    # requests are preempted and recomputed, and the output must not change.
    pipe = mii.pipeline(path, num_kv_blocks=12, max_num_batched_tokens=64, schedule_policy=policy)
    prompts = mixed_prompts(6, (40, 25, 48), seed=7)
    got = pipe(prompts, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert [r.token_ids for r in got] == hf_greedy(path, prompts, 30, min_new_tokens=30)
    engine = pipe.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_prefix_cache_hits_keep_parity(tiny_model):
    path = tiny_model("qwen2")
    pipe = mii.pipeline(path, max_num_batched_tokens=64)
    shared = mixed_prompts(1, (48,), seed=3)[0]
    prompts = [shared + tail for tail in mixed_prompts(4, (5, 9, 1, 20), seed=4)]
    pipe(prompts[:1], max_new_tokens=2, do_sample=False)  # warm the prefix cache
    before = pipe.engine.stats().prompt_tokens_processed
    got = pipe(prompts, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    computed = pipe.engine.stats().prompt_tokens_processed - before
    assert [r.token_ids for r in got] == hf_greedy(path, prompts, 12, min_new_tokens=12)
    # 48 shared tokens = 3 cached blocks per prompt that were not computed again.
    assert computed <= sum(len(p) for p in prompts) - 4 * 48 + 4


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_and_mostly_agrees(tiny_model, dtype):
    path = tiny_model("llama")
    prompts = mixed_prompts(4, (6, 30), seed=11)
    opts = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)
    full = mii.pipeline(path)(prompts, **opts)
    half = mii.pipeline(path, dtype=dtype)(prompts, **opts)
    first_tokens = [r.token_ids[0] for r in half]
    assert first_tokens == [r.token_ids[0] for r in full]


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a dragon who " * 6,
        "1, 2, 3, 4,",
        "Water boils at",
        "A short history of the printing press: " * 9,
    ]
    prompts = [tok.encode(t) for t in texts]
    assert max(len(p) for p in prompts) > 64  # longer than the budget below
    pipe = mii.pipeline(smollm2_path, max_num_batched_tokens=64)
    got = pipe(prompts, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    assert [r.token_ids for r in got] == hf_greedy(smollm2_path, prompts, 12, min_new_tokens=12)


@pytest.mark.slow
def test_smollm2_answers_the_demo_question(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    (resp,) = mii.pipeline(smollm2_path)(prompt, max_new_tokens=20, do_sample=False)
    assert resp.generated_text == "The capital of France is Paris."
    assert resp.finish_reason == mii.GenerationFinishReason.STOP
