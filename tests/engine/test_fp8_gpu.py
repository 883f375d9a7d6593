"""FP8 weights on CUDA: logits of a random-weight Llama of real width against bf16, both
GEMM paths (decode-sized steps take the Triton kernel, prefill-sized ones _scaled_mm with
fast accumulation), CUDA graphs, an FP8 checkpoint, and MoE experts in float8."""

from __future__ import annotations

import pytest
import torch
from fp8_testing import engine, prompt_logits, row_cosine, write_fp8_checkpoint
from tiny_models import greedy_tokens, mixed_prompts

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _llama_8b_width(folder) -> str:
    """Llama-3-8B's layer shapes, two layers, its config only (weights drawn on the GPU)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
        rope_theta=500000.0, dtype="bfloat16",
    ).save_pretrained(folder)  # fmt: skip
    return str(folder)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tokens", [12, 300])  # Triton W8A8; _scaled_mm, fast accumulation
def test_logits_agree_with_bf16_on_a_real_width(tmp_path, tokens):
    path = _llama_8b_width(tmp_path)
    options = dict(device="cuda", dtype="bfloat16", load_format="dummy", skip_tokenizer_init=True)
    ids = mixed_prompts(1, (tokens,), vocab=32000, seed=tokens)[0]
    bf16 = prompt_logits(engine(path, **options), ids)
    torch.cuda.empty_cache()
    fp8 = prompt_logits(engine(path, quantization="fp8", **options), ids)
    cos = row_cosine(fp8, bf16)
    assert cos.min() >= 0.99, cos.min()


@pytest.mark.timeout(300)
def test_norms_adding_the_gemv_split_sums_change_no_token(tmp_path, monkeypatch):
    """At batch 1 the output and down projections' float8 GEMVs leave their split-K
    partials to the RMSNorm after them (`defer_splits`): the tokens of the GEMV's own
    epilogue, in CUDA graphs and eager, at a width where those GEMVs split K."""
    from transformers import LlamaConfig

    from mii.engine.config import EngineConfig
    from mii.engine.engine import LLMEngine
    from mii.kernels import dispatch, gemv

    LlamaConfig(
        vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=3,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
        dtype="bfloat16",
    ).save_pretrained(tmp_path)  # fmt: skip
    assert gemv.gemv_tile(1, 1024, 1024, 1, 132).split_k > 1
    sums = []
    norm = dispatch.rms_norm
    monkeypatch.setattr(dispatch, "rms_norm", lambda x, *a: sums.append(x) or norm(x, *a))
    prompt = mixed_prompts(1, (9,), vocab=4096, seed=2)

    def run(flag: str, eager: bool) -> list[list[int]]:
        monkeypatch.setenv("MII_DEFER_SPLITS", flag)
        config = EngineConfig(
            model=str(tmp_path), device="cuda", dtype="bfloat16", quantization="fp8",
            load_format="dummy", skip_tokenizer_init=True, enforce_eager=eager,
        )  # fmt: skip
        return greedy_tokens(LLMEngine(config), prompt, 24)

    stored = run("0", eager=True)
    assert not any(isinstance(x, gemv.SplitSums) for x in sums)
    assert run("1", eager=True) == stored
    assert sum(isinstance(x, gemv.SplitSums) for x in sums) >= 2 * 3 * 23  # o and down
    assert run("1", eager=False) == stored


@pytest.mark.timeout(120)
def test_cuda_graphs_change_nothing_in_fp8(tiny_model):
    from mii.engine.config import EngineConfig, SchedulerConfig
    from mii.engine.engine import LLMEngine

    path = tiny_model("llama3")
    prompts = mixed_prompts(5, (3, 40, 11), seed=9)

    def run(eager: bool) -> list[list[int]]:
        config = EngineConfig(
            model=path, device="cuda", dtype="bfloat16", quantization="fp8",
            enforce_eager=eager, scheduler=SchedulerConfig(max_num_seqs=16),
        )  # fmt: skip
        return greedy_tokens(LLMEngine(config), prompts, 20)

    assert run(eager=False) == run(eager=True)


@pytest.mark.timeout(120)
def test_norms_quantizing_the_gemm_rows_change_no_token(tiny_model, monkeypatch):
    """The RMSNorms before qkv and gate_up hand the W8A8 GEMMs their rows quantized
    (`dispatch.rms_norm(..., quantize=True)`): the tokens of the separate quantization,
    over prefills and decode steps of several rows, in CUDA graphs too."""
    from mii.engine.config import EngineConfig, SchedulerConfig
    from mii.engine.engine import LLMEngine
    from mii.kernels import dispatch

    path = tiny_model("llama3")
    prompts = mixed_prompts(5, (3, 40, 11), seed=9)
    norm = dispatch.rms_norm
    calls = []

    def counted(*args):  # whether each call quantized (the sixth argument)
        calls.append(len(args) > 5 and args[5])
        return norm(*args)

    monkeypatch.setattr(dispatch, "rms_norm", counted)

    def run(flag: str) -> list[list[int]]:
        monkeypatch.setenv("MII_FP8_NORM_QUANT", flag)
        config = EngineConfig(
            model=path, device="cuda", dtype="bfloat16", quantization="fp8",
            scheduler=SchedulerConfig(max_num_seqs=16),
        )  # fmt: skip
        return greedy_tokens(LLMEngine(config), prompts, 20)

    separate = run("0")
    assert calls and not any(calls)
    calls.clear()
    assert run("1") == separate
    assert any(calls)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_fp8_checkpoint_on_the_gpu(tiny_model, tmp_path, fmt):
    """Loads as stored (the exact comparison is the CPU test's: tests/engine/test_fp8.py);
    the tiny model is chaotic and prefill-sized steps round activations to fp8 here."""
    from safetensors import safe_open

    path = write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), fmt)
    fp8 = engine(path, device="cuda", dtype="bfloat16")
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        stored = f.get_tensor("model.layers.1.mlp.down_proj.weight")
    down = fp8.runner.model.model.layers[1].mlp.down_proj
    assert torch.equal(down.weight.cpu().view(torch.uint8), stored.view(torch.uint8))
    ids = mixed_prompts(1, (70,), seed=4)[0]
    cos = row_cosine(
        prompt_logits(fp8, ids),
        prompt_logits(engine(path + "-ref", device="cuda", dtype="bfloat16"), ids),
    )
    assert cos.mean() >= 0.95 and cos.min() >= 0.8, (cos.mean(), cos.min())  # scales right


@pytest.mark.timeout(180)
@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_fp8_moe_experts_on_the_gpu(tiny_model, tmp_path, arch):
    """Experts in float8 from an FP8 checkpoint (values as stored) and quantized at load;
    both dequantize to the dequantized model's experts, and their logits stay close to its
    logits at most positions. Tiny random MoE models route chaotically: the attention's
    per-token activation quantization flips a near tie between experts at some positions
    (two H200s: Mixtral mean cosine 0.937, 21 of 70 rows below 0.95, the lowest 0.48), hence
    the median."""
    path = write_fp8_checkpoint(tiny_model(arch), str(tmp_path / "fp8"), "compressed-tensors")
    ids = mixed_prompts(1, (70,), seed=4)[0]
    ref_engine = engine(path + "-ref", device="cuda", dtype="bfloat16")
    ref = prompt_logits(ref_engine, ids)
    ref_experts = ref_engine.runner.model.model.layers[0].mlp.experts
    for source, options in ((path, {}), (path + "-ref", {"quantization": "fp8"})):
        fp8 = engine(source, device="cuda", dtype="bfloat16", **options)
        experts = fp8.runner.model.model.layers[0].mlp.experts
        assert experts.gate_up.weight.dtype == experts.down.weight.dtype == torch.float8_e4m3fn
        for stack, scale in zip((experts.gate_up, experts.down), experts.scales, strict=True):
            want = getattr(ref_experts, "gate_up" if stack is experts.gate_up else "down")
            got = stack.weight.float() * scale[..., None]
            torch.testing.assert_close(got, want.weight.float(), rtol=0.07, atol=1e-3)
        cos = row_cosine(prompt_logits(fp8, ids), ref)
        assert cos.median() >= 0.95 and cos.mean() >= 0.85, (source, cos.mean(), cos.min())
