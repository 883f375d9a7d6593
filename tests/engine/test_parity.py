"""Greedy parity, token for token, with transformers' generate on the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ALL_ARCHS, mixed_prompts

import mii


def hf_greedy(
    path: str, prompts: list[list[int]], max_new_tokens: int, config: dict | None = None, **kw
) -> list[list[int]]:
    """transformers' greedy generate, one prompt at a time; `config` overrides config fields."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(path)
    for key, value in (config or {}).items():
        setattr(hf_config, key, value)
    model = AutoModelForCausalLM.from_pretrained(path, config=hf_config, dtype=torch.float32)
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


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ALL_ARCHS)
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


# What each family's parity test relies on: without it transformers answers otherwise, so
# an implementation that ignored it would fail the parity test above.
FULL = ["full_attention"] * 2
FEATURES = {
    "mistral_swa": {"sliding_window": None},
    "qwen2_swa": {"layer_types": FULL},
    "gemma2": {"attn_logit_softcapping": None},
    "gemma2_window": {"layer_types": FULL},
    "qwen3": {"rms_norm_eps": 1.0},  # a norm of eps 1 flattens q and k: the norms matter
    "phi3": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                 "partial_rotary_factor": 0.5}},
}  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_the_family_features_change_the_output(tiny_model, feature):
    path = tiny_model(feature.split("_window")[0])
    prompts = mixed_prompts(4, (70, 130, 33, 9), seed=1)
    plain = hf_greedy(path, prompts, 24, min_new_tokens=24)
    assert hf_greedy(path, prompts, 24, FEATURES[feature], min_new_tokens=24) != plain


@pytest.mark.timeout(60)
def test_sliding_window_runs_past_the_cache_and_frees_blocks(tiny_model):
    """Mistral-style: every layer slides over 24 keys, so a sequence needs only its
    window's blocks; 300-token prompts run through a cache of 8 blocks (128 tokens)."""
    path = tiny_model("mistral_swa")
    pipe = mii.pipeline(path, num_kv_blocks=8, max_num_batched_tokens=32)
    engine = pipe.engine
    assert engine.max_model_len == 1024 > 8 * 16
    prompts = mixed_prompts(3, (300, 170, 9), seed=5)
    held = []
    stream = pipe.stream(prompts[0], max_new_tokens=30, min_new_tokens=30, do_sample=False)
    for _ in stream:
        held.append(engine.block_manager.num_blocks - engine.block_manager.num_free_blocks)
    assert max(held) <= 5  # ceil((24 + 32) / 16) + 1: the window and one step
    got = pipe(prompts, max_new_tokens=30, min_new_tokens=30, do_sample=False)
    assert [r.token_ids for r in got] == hf_greedy(path, prompts, 30, min_new_tokens=30)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.timeout(60)
def test_longrope_parity_with_asynchronous_scheduling(tiny_model):
    """Phi-3 recomputes a sequence's cache when it crosses LongRoPE's pretraining length;
    with asynchronous scheduling the crossing token is still on its way from the device."""
    path = tiny_model("phi3")
    pipe = mii.pipeline(path, max_num_batched_tokens=16, async_scheduling=True)
    prompts = mixed_prompts(4, (40, 47, 60, 3), seed=8)  # two cross 48 while generating
    got = pipe(prompts, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert [r.token_ids for r in got] == hf_greedy(path, prompts, 20, min_new_tokens=20)


@pytest.mark.timeout(60)
def test_gemma2_logprobs_see_the_final_soft_cap(tiny_model):
    """The final soft-cap keeps greedy tokens (tanh is monotonic) but changes every
    probability: the logprobs of the chosen tokens match transformers'."""
    from transformers import AutoModelForCausalLM

    path = tiny_model("gemma2")
    prompt = mixed_prompts(1, (40,), seed=3)[0]
    (got,) = mii.pipeline(path)(
        [prompt], max_new_tokens=6, min_new_tokens=6, do_sample=False, logprobs=0
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt + got.token_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # the 6 steps' logits
    expected = logits.log_softmax(-1).gather(-1, torch.tensor(got.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(got.logprobs), expected, atol=1e-4)
    assert logits.abs().max() <= 5.0  # capped at final_logit_softcapping


@pytest.mark.timeout(60)
def test_unknown_architectures_fail_with_the_supported_list(tiny_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "mamba"
    shutil.copytree(tiny_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(architectures=["MambaForCausalLM"], model_type="mamba")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"MambaForCausalLM.*supported:.*Falcon.*Gemma2.*Qwen3"):
        mii.pipeline(str(folder))


@pytest.mark.timeout(60)
def test_falcon_with_alibi_says_it_is_not_supported(tiny_model, tmp_path):
    import json
    import shutil

    folder = tmp_path / "falcon-rw"
    shutil.copytree(tiny_model("falcon_seq"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "alibi": True}))
    with pytest.raises(NotImplementedError, match="ALiBi"):
        mii.pipeline(str(folder))
