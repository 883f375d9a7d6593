"""The fp8 KV cache in the engine: the option, the calibrated scales and a checkpoint's own,
twice the blocks in the same memory, greedy agreement with the full-precision cache (CPU
and GPU)."""

from __future__ import annotations

import typing

import pytest
import torch
from tiny_models import greedy_tokens, mixed_prompts

from mii.config import ModelConfig
from mii.engine import kv_cache
from mii.engine.config import KV_CACHE_DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.kernels.torch_ref import FP8_DTYPE, FP8_MAX

pytestmark = pytest.mark.timeout(120)
GIB = 1 << 30


def make_engine(
    path, kv_cache_dtype="auto", device="cpu", dtype="float32", budget=32, enforce_eager=False,
    **cache,
):  # fmt: skip
    config = EngineConfig(
        model=path,
        dtype=dtype,
        device=device,
        enforce_eager=enforce_eager,
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=64),
        cache=CacheConfig(kv_cache_dtype=kv_cache_dtype, **cache),
    )
    return LLMEngine(config)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def agreement(ours: list[list[int]], reference: list[list[int]]) -> float:
    """The fraction of tokens the same, free-running: one early flip of a near tie and the
    rest of a sequence differs (random tiny models have many near ties)."""
    pairs = [
        (a, b) for o, r in zip(ours, reference, strict=True) for a, b in zip(o, r, strict=True)
    ]
    return sum(a == b for a, b in pairs) / len(pairs)


def next_token_agreement(engine, prompts, reference: list[list[int]]) -> float:
    """Teacher-forced: the fraction of the reference's tokens that the engine picks next
    after the prompt and the reference's tokens before it. Errors do not compound."""
    contexts = [p + r[:j] for p, r in zip(prompts, reference, strict=True) for j in range(len(r))]
    wanted = [t for r in reference for t in r]
    got = greedy_tokens(engine, contexts, 1)
    return sum(g == [t] for g, t in zip(got, wanted, strict=True)) / len(wanted)


def compare_generation(path, prompts, new_tokens, record_property=None, **options) -> tuple:
    """(free-running, next-token) agreement of an fp8 cache with the 'auto' one."""
    reference = greedy_tokens(make_engine(path, "auto", **options), prompts, new_tokens)
    engine = make_engine(path, "fp8", **options)
    free = agreement(greedy_tokens(engine, prompts, new_tokens), reference)
    forced = next_token_agreement(engine, prompts, reference)
    if record_property is not None:
        record_property("identical_fraction", free)
        record_property("next_token_agreement", forced)
    print(f"fp8 cache vs auto: identical {free:.3f}, next-token {forced:.3f}")
    return free, forced


# ---- the option --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["int8", "fp16", "FP8", "e4m3"])
def test_an_unknown_kv_cache_dtype_is_refused_with_the_choices(name):
    with pytest.raises(ValueError, match="'auto', 'fp8'.*'fp8_e4m3'"):
        CacheConfig(kv_cache_dtype=name)
    with pytest.raises(ValueError, match="'auto', 'fp8' or 'fp8_e4m3'"):
        ModelConfig(model_name_or_path="m", kv_cache_dtype=name)


def test_the_public_option_reaches_the_engine():
    annotation = ModelConfig.model_fields["kv_cache_dtype"].annotation
    assert typing.get_args(annotation) == KV_CACHE_DTYPES
    config = ModelConfig(model_name_or_path="m", kv_cache_dtype="fp8").to_engine_config()
    assert config.cache.kv_cache_dtype == "fp8"


def test_the_cli_takes_kv_cache_dtype():
    import argparse

    from mii.config_options import MODEL, add_config_options, config_values

    parser = argparse.ArgumentParser()
    add_config_options(parser, (MODEL,))
    values = config_values(parser.parse_args(["--kv-cache-dtype", "fp8"]), (MODEL,))
    assert values[MODEL.title]["kv_cache_dtype"] == "fp8"


def test_scales_from_absmax_leave_headroom_and_never_vanish():
    absmax = torch.tensor([448.0, 1.0, 0.0, float("inf")])
    scales = kv_cache.scales_from_absmax(absmax)
    assert scales.dtype == torch.float32
    assert scales[:2].tolist() == pytest.approx([kv_cache.HEADROOM, kv_cache.HEADROOM / 448])
    assert scales[2:].tolist() == [1.0, 1.0]


# ---- on the CPU --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fp8", "fp8_e4m3"])
def test_an_fp8_cache_has_calibrated_scales(tiny_model, name):
    engine = make_engine(tiny_model("llama"), name, num_blocks=64)
    runner = engine.runner
    assert runner.kv_cache.dtype == FP8_DTYPE
    layers, heads = len(runner.attention_layers), runner.attention_layers[0].num_kv_heads
    assert runner.kv_scales.shape == (2, layers, heads)
    assert (runner.kv_scales > 0).all() and runner.kv_scales.isfinite().all()
    assert runner.attention_layers[1].v_scale.data_ptr() == runner.kv_scales[1, 1].data_ptr()
    greedy_tokens(engine, mixed_prompts(4, (40, 9), seed=2), 8)
    cached = runner.kv_cache.float().abs().amax(dim=(2, 3, 5))  # (2, layers, Hkv)
    # calibration's largest values land near FP8_MAX / HEADROOM; text keeps within range
    assert (cached > 0).all() and (cached <= FP8_MAX).all()
    assert (cached >= FP8_MAX / kv_cache.HEADROOM / 4).all()


SCALE_FORMS = {
    # llm-compressor / vLLM: one K and one V scalar under self_attn
    "k_scale": lambda i: {f"model.layers.{i}.self_attn.k_scale": 0,
                          f"model.layers.{i}.self_attn.v_scale": 1},
    # older AutoFP8: one scalar for both
    "kv_scale": lambda i: {f"model.layers.{i}.self_attn.kv_scale": 0},
    # compressed-tensors: the K and V projections' output scales
    "output_scale": lambda i: {f"model.layers.{i}.self_attn.k_proj.output_scale": 0,
                               f"model.layers.{i}.self_attn.v_proj.output_scale": 1},
}  # fmt: skip


def test_checkpoint_scale_names():
    names = {
        "model.layers.3.self_attn.k_scale": ("3", "k"),
        "model.layers.12.self_attn.attn.v_scale": ("12", "v"),
        "model.layers.0.self_attn.kv_scale": ("0", "kv"),
        "model.layers.7.self_attn.v_proj.output_scale": ("7", "v"),
        "transformer.h.layers.1.self_attention.k_scale": ("1", "k"),
    }
    for name, (layer, kind) in names.items():
        match = kv_cache.CHECKPOINT_SCALE.search(name)
        assert match and (match.group(1), match.group(2) or match.group(3)) == (layer, kind)
    for other in ("model.layers.0.self_attn.q_proj.weight_scale", "model.layers.0.mlp.k_scale_x",
                  "model.layers.0.self_attn.o_proj.output_scale",
                  "model.layers.0.self_attn.k_proj.input_scale"):  # fmt: skip
        assert kv_cache.CHECKPOINT_SCALE.search(other) is None, other


def _with_kv_scales(path: str, scales: dict[str, float]) -> None:
    from safetensors.torch import load_file, save_file

    file = f"{path}/model.safetensors"
    tensors = load_file(file)
    tensors.update({name: torch.tensor(value) for name, value in scales.items()})
    save_file(tensors, file)


@pytest.mark.parametrize("form", sorted(SCALE_FORMS))
def test_an_fp8_checkpoint_gives_its_kv_scales(tiny_model, tmp_path, form):
    """A checkpoint's per-layer scales are what the cache uses, every head of a layer alike,
    with nothing calibrated; generation stays as close to the calibrated cache's as the
    format allows."""
    from fp8_testing import write_fp8_checkpoint

    path = write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), "fp8")
    calibrated = make_engine(path, "fp8", num_blocks=64)
    per_layer = calibrated.runner.kv_scales.amax(dim=2)  # (2, layers): one scalar a layer
    layers = per_layer.shape[1]
    stored = {}
    for i in range(layers):
        for name, kv in SCALE_FORMS[form](i).items():
            stored[name] = per_layer[kv, i].item() * (1 + 0.05 * (2 * i + kv))  # all distinct
    _with_kv_scales(path, stored)
    engine = make_engine(path, "fp8", num_blocks=64)
    scales = engine.runner.kv_scales
    heads = engine.runner.attention_layers[0].num_kv_heads
    assert scales.shape == (2, layers, heads)
    for i in range(layers):
        for name, kv in SCALE_FORMS[form](i).items():
            for which in (0, 1) if form == "kv_scale" else (kv,):
                assert torch.equal(scales[which, i], torch.full((heads,), stored[name]))
    # next-token agreement with the full-precision cache, as near as the calibrated scales'
    prompts = mixed_prompts(8, (40, 9, 70, 3), seed=5)
    reference = greedy_tokens(make_engine(path, "auto", num_blocks=64), prompts, 8)
    ours = next_token_agreement(engine, prompts, reference)
    theirs = next_token_agreement(calibrated, prompts, reference)
    print(f"next-token agreement: checkpoint scales {ours:.3f}, calibrated {theirs:.3f}")
    assert ours >= max(0.5, theirs - 0.15)  # a broken cache agrees on ~0.003
    assert engine.runner.kv_cache.float().isfinite().all()


def test_partial_checkpoint_kv_scales_are_reported_and_calibrated(tiny_model, tmp_path, caplog):
    from fp8_testing import write_fp8_checkpoint

    path = write_fp8_checkpoint(tiny_model("llama3"), str(tmp_path / "fp8"), "fp8")
    expected = make_engine(path, "fp8", num_blocks=64).runner.kv_scales
    _with_kv_scales(path, {"model.layers.0.self_attn.k_scale": 0.5,
                           "model.layers.0.self_attn.v_scale": 0.5})  # fmt: skip
    with caplog.at_level("WARNING", logger="mii.engine.kv_cache"):
        engine = make_engine(path, "fp8", num_blocks=64)
    assert torch.equal(engine.runner.kv_scales, expected)
    assert "calibrates its own scales" in caplog.text
    # the scales stay out of the weights, and an 'auto' cache ignores them
    assert make_engine(path, "auto", num_blocks=64).runner.kv_scales is None


def test_the_same_memory_holds_four_times_the_fp32_blocks(tiny_model):
    path = tiny_model("llama")
    full = make_engine(path, "auto", cpu_kv_cache_gib=0.001)
    fp8 = make_engine(path, "fp8", cpu_kv_cache_gib=0.001)
    assert full.runner.bytes_per_block == 4 * fp8.runner.bytes_per_block
    assert fp8.runner.num_blocks // 4 == full.runner.num_blocks  # both floored


def test_an_fp8_cache_holds_the_full_precision_cache_to_fp8_rounding(tiny_model):
    """Same prompts, same blocks: the first layer's keys and values (the same input in both
    engines) differ by e4m3's rounding only (about 3%); later layers add what the earlier
    ones' attention passed on."""
    path = tiny_model("llama")
    prompts = mixed_prompts(6, (1, 5, 17, 70, 33, 130), seed=3)
    full, fp8 = make_engine(path, "auto", num_blocks=64), make_engine(path, "fp8", num_blocks=64)
    greedy_tokens(full, prompts, 1)
    greedy_tokens(fp8, prompts, 1)
    scales = fp8.runner.kv_scales[:, :, None, None, :, None]  # (2, layers, 1, 1, Hkv, 1)
    back = fp8.runner.kv_cache.float() * scales
    expected = full.runner.kv_cache
    for kv in range(2):
        assert rel_err(back[kv, 0], expected[kv, 0]) < 0.04
        assert rel_err(back[kv], expected[kv]) < 0.15


@pytest.mark.parametrize("arch", ["llama", "mistral_swa", "gemma2", "opt"])
def test_fp8_cache_agrees_with_the_full_precision_cache_on_the_cpu(
    tiny_model, arch, record_property
):
    """Sliding windows (mistral_swa, gemma2), soft-capping (gemma2), no rotary (opt). Random
    tiny models: next-token agreement 0.83 to 0.95 (2026-11-27); a broken cache ~0.003."""
    prompts = mixed_prompts(6, (1, 5, 17, 70, 33, 130), seed=3)
    _, forced = compare_generation(tiny_model(arch), prompts, 16, record_property)
    assert forced >= 0.75


@pytest.mark.slow
def test_fp8_cache_agrees_on_smollm2_on_the_cpu(smollm2_path, record_property):
    """A real model: next-token agreement 0.98, free-running 0.86 (2026-11-27, fp32)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompts = [tok.encode(t) for t in SMOLLM2_TEXTS]
    _, forced = compare_generation(smollm2_path, prompts, 12, record_property, budget=256)
    assert forced >= 0.9


SMOLLM2_TEXTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three laws of thermodynamics are",
)


# ---- on the GPU --------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("eager", [False, True], ids=["graphs", "eager"])
@pytest.mark.parametrize("arch", ["llama", "mistral_swa", "gemma2"])
def test_fp8_cache_agrees_with_the_bf16_cache_on_the_gpu(tiny_model, arch, eager, record_property):
    """Through the Triton kernels, with and without CUDA graphs; sliding windows and
    soft-capping (mistral_swa, gemma2); prompts longer than the budget (chunked prefill)."""
    prompts = mixed_prompts(8, (12, 48, 5, 90, 300, 1), seed=13)
    options = dict(device="cuda", dtype="bfloat16", num_blocks=2048, budget=64,
                   enforce_eager=eager)  # fmt: skip
    _, forced = compare_generation(tiny_model(arch), prompts, 32, record_property, **options)
    assert forced >= 0.75


@pytest.mark.gpu
@needs_cuda
def test_fp8_cache_agrees_on_smollm2_on_the_gpu(record_property):
    from mii.engine.demo_model import demo_model_path, needs_conversion

    if needs_conversion("smollm2"):
        pytest.skip("the demo model is not converted on this machine (mii/engine/demo_model.py)")
    path = str(demo_model_path("smollm2"))
    from transformers import AutoTokenizer

    prompts = [AutoTokenizer.from_pretrained(path).encode(t) for t in SMOLLM2_TEXTS]
    options = dict(device="cuda", dtype="bfloat16", budget=256)
    _, forced = compare_generation(path, prompts, 32, record_property, **options)
    assert forced >= 0.9


@pytest.mark.gpu
@needs_cuda
def test_fp8_cache_doubles_the_blocks_of_a_bf16_cache_on_the_gpu(tiny_model, monkeypatch):
    """The same budget (a pretend 2 GiB GPU, all free) in bf16 and in fp8."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * GIB, 2 * GIB))
    path = tiny_model("llama")
    counts = {}
    for name in ("auto", "fp8"):
        engine = make_engine(path, name, device="cuda", dtype="bfloat16",
                             gpu_memory_utilization=0.01)  # fmt: skip
        counts[name] = engine.runner.num_blocks
        engine.close()
        del engine
    assert counts["fp8"] >= 1.9 * counts["auto"], counts
