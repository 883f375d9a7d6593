"""FP8 weights on the CPU: the quantize / dequantize round trip, a tiny model quantized at
load against its float self, FP8 checkpoints (AutoFP8's per-tensor scales, compressed-
tensors' per-channel ones) loading as stored, their scales sharded under tensor
parallelism, MoE checkpoints' float8 experts loading dequantized, the options that ask for
FP8, and SmolLM2's greedy tokens in FP8."""

from __future__ import annotations

import pytest
import torch
from fp8_testing import (
    batch_logits,
    engine,
    prompt_logits,
    row_cosine,
    write_fp8_checkpoint,
)
from tiny_models import MOE_ARCHS, greedy_tokens, mixed_prompts

import mii
from mii.config import ModelConfig
from mii.engine.layers.fp8_linear import Dequantized, Fp8LinearMethod
from mii.engine.layers.linear import LinearBase
from mii.engine.quantization import checkpoint_quantization
from mii.kernels.fp8_ref import FP8, FP8_MAX, dequantize_rows, quantize_rows


def test_round_trip_is_within_e4m3_rounding():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    w[5] = 0.0  # an all-zero row keeps a finite scale
    q, scale = quantize_rows(w)
    assert q.dtype == FP8 and scale.shape == (64,) and torch.isfinite(scale).all()
    assert torch.equal(q.float().abs().amax(-1)[w.abs().amax(-1) > 0], torch.full((63,), FP8_MAX))
    back = dequantize_rows(q, scale, torch.float32)
    # 3 mantissa bits: half a unit in the last place is 1/16 of the value (normal range)
    normal = w.abs() >= scale[:, None] * 2.0**-6
    assert ((back - w).abs() <= w.abs() / 16 + 1e-12)[normal].all()
    assert (back - w).norm() / w.norm() < 0.03
    assert torch.equal(quantize_rows(back)[0].view(torch.uint8), q.view(torch.uint8))


def _fp8_layers(eng) -> list[LinearBase]:
    modules = eng.runner.model.modules()
    return [m for m in modules if isinstance(getattr(m, "method", None), Fp8LinearMethod)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_quantized_at_load_agrees_with_the_float_model(tiny_model, arch):
    path = tiny_model(arch)
    ids = mixed_prompts(1, (90,), seed=3)[0]
    full, fp8 = engine(path), engine(path, quantization="fp8")
    layers = _fp8_layers(fp8)
    assert len(layers) == 4 * 2  # qkv, o, gate_up, down of both layers
    assert all(m.weight.dtype == FP8 and m.weight_scale.dtype == torch.float32 for m in layers)
    # The tiny models' weights (std 0.2) make them chaotic, FP8's rounding grows through
    # them: their bar is lower than real models' (tests/engine/test_fp8_gpu.py: 0.99).
    cos = row_cosine(prompt_logits(fp8, ids), prompt_logits(full, ids))
    print(cos.mean(), cos.min())
    assert cos.mean() >= 0.98 and cos.min() >= 0.9, (cos.mean(), cos.min())
    tokens = greedy_tokens(fp8, mixed_prompts(3, (5, 40), seed=1), 6)
    assert all(len(t) == 6 for t in tokens)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_fp8_checkpoint_loads_as_stored(tiny_model, tmp_path, fmt):
    path = write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), fmt)
    fp8, ref = engine(path), engine(path + "-ref")
    layers = _fp8_layers(fp8)
    assert len(layers) == 8 and not _fp8_layers(ref)
    assert all(m.method.from_checkpoint for m in layers)
    from safetensors import safe_open

    with safe_open(f"{path}/model.safetensors", "pt") as f:  # q, k, v: each its own scale
        stored = [f.get_tensor(f"model.layers.0.self_attn.{p}_proj.weight") for p in "qkv"]
        scales = [f.get_tensor(f"model.layers.0.self_attn.{p}_proj.weight_scale") for p in "qkv"]
    qkv = fp8.runner.model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv.weight.view(torch.uint8), torch.cat(stored).view(torch.uint8))
    rows = [s.reshape(-1).expand(len(w)) for s, w in zip(scales, stored, strict=True)]
    assert torch.equal(qkv.weight_scale, torch.cat(rows))
    ids = mixed_prompts(1, (70,), seed=4)[0]
    assert torch.allclose(prompt_logits(fp8, ids), prompt_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(120)
def test_fp8_checkpoint_scales_shard_with_tensor_parallelism(tiny_model, tmp_path):
    path = write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), "fp8")
    prompts = mixed_prompts(4, (1, 17, 70, 5), seed=2)
    opts = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False)

    def run(**kwargs):
        pipe = mii.pipeline(path, max_num_batched_tokens=32, **kwargs)
        try:
            return [r.token_ids for r in pipe(prompts, **opts)]
        finally:
            pipe.destroy()

    assert run(tensor_parallel=2) == run()


def test_dequantized_weights_index_as_the_loaders_do():
    gen = torch.Generator().manual_seed(1)
    q, row_scale = quantize_rows(torch.randn(12, 20, generator=gen))
    for scale in (row_scale, torch.tensor([0.03])):
        full = q.float() * (scale[:, None] if scale.numel() > 1 else scale)
        weight = Dequantized(q, scale)
        for index in (..., slice(4, 9), (slice(None), slice(5, 15))):
            assert torch.equal(weight[index], full[index]), index


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_fp8_moe_checkpoint_loads_its_experts_dequantized(tiny_model, tmp_path, arch, fmt):
    """Every expert stored in float8 with its scale: the experts hold exactly the
    dequantized weights (the model's dtype; the fused kernel runs them as any experts), the
    attention and dense layers stay FP8, and the logits equal the dequantized model's."""
    path = write_fp8_checkpoint(tiny_model(arch), str(tmp_path / "fp8"), fmt)
    fp8, ref = engine(path), engine(path + "-ref")
    assert _fp8_layers(fp8) and not _fp8_layers(ref)
    ours, theirs = fp8.runner.model.model.layers[0].mlp, ref.runner.model.model.layers[0].mlp
    for stack in ("gate_up", "down"):
        mine, wanted = getattr(ours.experts, stack).weight, getattr(theirs.experts, stack).weight
        assert mine.dtype == wanted.dtype == torch.float32 and torch.equal(mine, wanted)
    ids = mixed_prompts(1, (40,), seed=6)[0]
    assert torch.allclose(prompt_logits(fp8, ids), prompt_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(120)
def test_fp8_moe_checkpoint_shards_its_experts_with_tensor_parallelism(tiny_model, tmp_path):
    """Per-row scales follow each rank's rows of gate and up and its columns of down."""
    path = write_fp8_checkpoint(tiny_model("mixtral"), str(tmp_path / "fp8"), "compressed-tensors")
    prompts = mixed_prompts(3, (1, 17, 40), seed=2)
    opts = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False)

    def run(folder, **kwargs):
        pipe = mii.pipeline(folder, max_num_batched_tokens=32, **kwargs)
        try:
            return [r.token_ids for r in pipe(prompts, **opts)]
        finally:
            pipe.destroy()

    assert run(path, tensor_parallel=2) == run(path + "-ref", tensor_parallel=2)


@pytest.fixture
def fp8_experts_on_cpu(monkeypatch):
    """Float8 experts on the CPU too (the engine keeps them so on CUDA only): the reference
    then dequantizes the experts each step uses, as the kernel's contract says."""
    from mii.engine import quantization
    from mii.engine.layers.moe import FusedExperts

    def every_experts(model, device):
        return (m for m in model.modules() if isinstance(m, FusedExperts))

    monkeypatch.setattr(quantization, "_gpu_experts", every_experts)


def _experts(eng):
    return eng.runner.model.model.layers[0].mlp.experts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("arch", MOE_ARCHS)
@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_fp8_moe_checkpoint_keeps_its_experts_in_float8(
    tiny_model, tmp_path, arch, fmt, fp8_experts_on_cpu
):
    """As on CUDA: the experts hold the checkpoint's float8 values and one scale per row
    (a per-tensor scale repeated), and compute what the dequantized model computes."""
    from safetensors import safe_open

    names = ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    moe = "block_sparse_moe" if arch == "mixtral" else "mlp"
    path = write_fp8_checkpoint(tiny_model(arch), str(tmp_path / "fp8"), fmt)
    fp8, ref = engine(path), engine(path + "-ref")
    experts = _experts(fp8)
    assert experts.gate_up.weight.dtype == experts.down.weight.dtype == FP8
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        stored = [f.get_tensor(f"model.layers.0.{moe}.experts.1.{n}.weight") for n in names]
        scales = [f.get_tensor(f"model.layers.0.{moe}.experts.1.{n}.weight_scale") for n in names]
    gate_up = torch.cat(stored[:2])
    assert torch.equal(experts.gate_up.weight[1].view(torch.uint8), gate_up.view(torch.uint8))
    assert torch.equal(experts.down.weight[1].view(torch.uint8), stored[2].view(torch.uint8))
    rows = [s.reshape(-1).expand(len(w)) for s, w in zip(scales, stored, strict=True)]
    assert torch.equal(experts.scales[0][1], torch.cat(rows[:2]))
    assert torch.equal(experts.scales[1][1], rows[2])
    ids = mixed_prompts(1, (40,), seed=6)[0]
    assert torch.allclose(prompt_logits(fp8, ids), prompt_logits(ref, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(120)
def test_experts_quantized_at_load(tiny_model, fp8_experts_on_cpu):
    """quantization='fp8' over an unquantized MoE checkpoint: each expert's rows quantized
    with their own scales once loaded, and the model computes what it computes with those
    experts dequantized back into float32."""
    from mii.engine.layers.moe import FusedExperts

    path = tiny_model("mixtral")
    fp8, twin = engine(path, quantization="fp8"), engine(path, quantization="fp8")
    full = engine(path)
    experts, original = _experts(fp8), _experts(full)
    assert experts.gate_up.weight.dtype == experts.down.weight.dtype == FP8
    assert experts.scales[0].shape == experts.gate_up.weight.shape[:2]
    assert experts.scales[1].shape == experts.down.weight.shape[:2]
    back = dequantize_rows(experts.gate_up.weight[3], experts.scales[0][3], torch.float32)
    assert (back - original.gate_up.weight[3]).norm() / original.gate_up.weight[3].norm() < 0.03
    for module in twin.runner.model.modules():
        if isinstance(module, FusedExperts):
            for stack, scale in zip((module.gate_up, module.down), module.scales, strict=True):
                w = stack.weight.data
                stack.weight.data = torch.stack(
                    [dequantize_rows(w[e], scale[e], torch.float32) for e in range(len(w))]
                )
            module.gate_up_scale = module.down_scale = None
    ids = mixed_prompts(1, (40,), seed=6)[0]
    assert torch.allclose(prompt_logits(fp8, ids), prompt_logits(twin, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.timeout(60)
@pytest.mark.timeout(60)
def test_random_float8_experts(tiny_model, fp8_experts_on_cpu):
    """load_format='dummy' with quantization='fp8' (benchmarks): the experts are drawn in
    float8 with their scales, never in the model's dtype, and the model generates."""
    fp8 = engine(tiny_model("mixtral"), quantization="fp8", load_format="dummy")
    experts = _experts(fp8)
    assert experts.gate_up.weight.dtype == FP8
    for scale in experts.scales:
        assert (scale > 0).all() and scale.isfinite().all()
    back = dequantize_rows(experts.down.weight[0], experts.scales[1][0], torch.float32)
    assert 0.015 < back.std() < 0.025  # Normal(0, 0.02)
    assert all(len(t) == 5 for t in greedy_tokens(fp8, mixed_prompts(2, (9, 30), seed=3), 5))


def test_a_quantized_model_is_built_without_its_full_precision_weights(tiny_model, tmp_path):
    """An FP8 model's parameters stay on the meta device until the quantization has put
    its float8 ones in place: the model's-dtype weights of the layers it covers are never
    allocated; tied embeddings stay tied, rotary tables are real from the start."""
    from transformers import AutoConfig

    from mii.engine.loader import build_model, materialize
    from mii.engine.tp.context import SINGLE

    path = tiny_model("opt")
    model = build_model(AutoConfig.from_pretrained(path), torch.float32, torch.device("cpu"),
                        SINGLE, 64, weights_on_meta=True)  # fmt: skip
    assert all(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    materialize(model, torch.device("cpu"))
    assert not any(p.is_meta for p in model.parameters())
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    rotary = build_model(AutoConfig.from_pretrained(tiny_model("llama")), torch.float32,
                         torch.device("cpu"), SINGLE, 64, weights_on_meta=True)  # fmt: skip
    assert all(not b.is_meta for b in rotary.buffers()) and any(True for _ in rotary.buffers())
    fp8 = engine(write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), "fp8"))
    assert not any(p.is_meta for p in fp8.runner.model.parameters())
    assert not any(b.is_meta for b in fp8.runner.model.buffers())


def test_checkpoint_quantization_configs():
    def of(qc):
        return checkpoint_quantization(type("C", (), {"quantization_config": qc})())

    assert of(None) is None
    assert of({"quant_method": "fp8", "activation_scheme": "dynamic"}) == "fp8"
    with pytest.raises(ValueError, match="'fp8' with block scales \\[128, 128\\] is not"):
        of({"quant_method": "fp8", "weight_block_size": [128, 128]})
    with pytest.raises(ValueError, match="quantization 'awq' is not supported"):
        of({"quant_method": "awq", "bits": 4})
    int4 = {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "config_groups": {"g": {"weights": {"num_bits": 4, "type": "int"}}}}  # fmt: skip
    with pytest.raises(ValueError, match="'compressed-tensors' in format 'pack-quantized'"):
        of(int4)


def test_options_that_ask_for_fp8():
    assert ModelConfig(model_name_or_path="m", quantization="fp8").to_engine_config().quantization
    assert ModelConfig(model_name_or_path="m", quantization_mode="fp8").quantization == "fp8"
    assert ModelConfig(model_name_or_path="m").to_engine_config().quantization is None
    with pytest.raises(ValueError, match="quantization_mode 'wf6af16' is not supported"):
        ModelConfig(model_name_or_path="m", quantization_mode="wf6af16")
    with pytest.raises(ValueError, match="quantization is 'fp8' or none"):
        ModelConfig(model_name_or_path="m", quantization="int4")


def test_the_command_line_and_serve_take_fp8(monkeypatch):
    from mii.cli import build_parser
    from mii.config_forms import mii_config_of
    from mii.config_options import serve_kwargs

    monkeypatch.delenv("MII_QUANTIZATION", raising=False)
    kwargs = serve_kwargs(build_parser("serve").parse_args(["serve", "m", "--quantization", "fp8"]))
    assert kwargs["quantization"] == "fp8"
    config = mii_config_of("m", None, None, {"quantization": "fp8"})  # mii.serve's keywords
    assert config.model_conf.to_engine_config().quantization == "fp8"
    monkeypatch.setenv("MII_QUANTIZATION", "fp8")
    assert serve_kwargs(build_parser("serve").parse_args(["serve", "m"]))["quantization"] == "fp8"


SENTENCES = (
    "The capital of France is", "def fibonacci(n):", "Water boils at", "Once upon a time",
    "The best way to learn a language is", "import numpy as np\n", "My favourite food is",
    "The theory of relativity says that", "To make a cup of tea,", "The moon is",
    "In 1492, Columbus", "A haiku about autumn:", "The three primary colours are",
    "SELECT name FROM users WHERE", "Photosynthesis is the process", "Dear Sir or Madam,",
    "The largest planet in the solar system is", "for i in range(10):", "Cats are",
    "The recipe calls for two cups of", "Machine learning is", "The weather today is",
    "Shakespeare wrote", "A good night's sleep", "The stock market", "Mount Everest is",
    "The French Revolution began", "Exercise helps", "An apple a day", "The internet was",
    "Bees make honey by", "The Pythagorean theorem states",
)  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_smollm2_greedy_tokens_agree_in_fp8(smollm2_path):
    """32 prompts x 64 greedy tokens of the float model; FP8 (dequantized on the CPU) must
    pick the same next token at >= 90% of those positions, each judged on the float
    model's own text (teacher-forced: one early difference does not count 64 times)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompts = [tok.encode(s) for s in SENTENCES]
    full, fp8 = engine(smollm2_path), engine(smollm2_path, quantization="fp8")
    texts = [p + o for p, o in zip(prompts, greedy_tokens(full, prompts, 64), strict=True)]
    same = total = 0
    for lo in range(0, len(texts), 8):  # 8 sequences a prefill: (8 * 70, 49152) logits
        group, starts = texts[lo : lo + 8], [len(p) - 1 for p in prompts[lo : lo + 8]]
        want = batch_logits(full, group)
        got = batch_logits(fp8, group)
        for w, g, start in zip(want, got, starts, strict=True):
            same += int((g[start:-1].argmax(-1) == w[start:-1].argmax(-1)).sum())
            total += len(w) - 1 - start
    assert total == 32 * 64
    assert same / total >= 0.9, same / total
