"""Helpers of the FP8 tests: an engine's logits at every position of one prompt, cosine
similarity per row, and FP8 checkpoints written from a float one."""

from __future__ import annotations

import json
import os
import shutil

import torch

from mii.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.layers.attention import AttentionMetadata
from mii.kernels.fp8_ref import FP8, dequantize_rows, quantize_rows

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "w1", "w2", "w3")  # fmt: skip
"""Stored in float8: attention and MLP projections, and the experts of MoE models (Mixtral's
w1/w2/w3, Qwen2-MoE's gate/up/down_proj under experts.{e})."""


def engine(path: str, device: str = "cpu", **options) -> LLMEngine:
    config = EngineConfig(
        model=path, device=device, enforce_eager=True,
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=32),
        cache=CacheConfig(num_blocks=256), **options,
    )  # fmt: skip
    return LLMEngine(config)


@torch.inference_mode()
def prompt_logits(eng: LLMEngine, ids: list[int]) -> torch.Tensor:
    """(T, vocab) float32 logits of every position of `ids`, as one prefill from position 0
    into the engine's cache (blocks 0..; the engine must hold no request)."""
    return batch_logits(eng, [ids])[0]


@torch.inference_mode()
def batch_logits(eng: LLMEngine, seqs: list[list[int]]) -> list[torch.Tensor]:
    """`prompt_logits` of several sequences in one ragged prefill (consecutive blocks)."""
    runner = eng.runner
    dev, bs = runner.device, runner.block_size
    lens = [len(s) for s in seqs]
    blocks = [-(-n // bs) for n in lens]
    first = torch.tensor([0, *blocks]).cumsum(0)  # each sequence's first block
    tables = torch.zeros(len(seqs), max(blocks), dtype=torch.int32)
    for i, n in enumerate(blocks):
        tables[i, :n] = torch.arange(first[i], first[i] + n)
    slots = torch.cat([first[i] * bs + torch.arange(n) for i, n in enumerate(lens)])
    meta = AttentionMetadata(
        slot_mapping=slots.to(dev),
        block_tables=tables.to(dev),
        query_start_loc=torch.tensor([0, *lens], dtype=torch.int32).cumsum(0).int().to(dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        max_query_len=max(lens),
        max_seq_len=max(lens),
    )
    ids = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=dev)
    positions = torch.cat([torch.arange(n) for n in lens]).to(dev)
    hidden = runner.model(ids, positions, meta)
    return list(runner.model.compute_logits(hidden).float().split(lens))


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def write_fp8_checkpoint(src: str, dst: str, fmt: str) -> str:
    """`src`'s model with its attention and MLP weights stored in float8 and `dst` + '-ref'
    holding the same weights dequantized (what the FP8 model must compute). `fmt`: 'fp8'
    (AutoFP8: per-tensor scalar scales, static input scales) or 'compressed-tensors'
    (per-channel scales of shape (N, 1))."""
    from safetensors.torch import load_file, save_file

    per_channel = fmt == "compressed-tensors"
    tensors = load_file(os.path.join(src, "model.safetensors"))
    fp8, ref = {}, {}
    for name, w in tensors.items():
        if not (name.endswith(".weight") and any(f".{n}." in name for n in LINEAR_NAMES)):
            fp8[name] = ref[name] = w
            continue
        q, scale = _quantize(w, per_channel)
        prefix = name.removesuffix(".weight")
        fp8[name] = q
        fp8[prefix + ".weight_scale"] = scale if per_channel else scale.reshape(())
        fp8[prefix + ".input_scale"] = torch.tensor(0.05)  # unused: activations are dynamic
        ref[name] = dequantize_rows(q, scale.reshape(-1).expand(q.shape[0]), w.dtype)
    for folder, weights, quantized in ((dst, fp8, True), (dst + "-ref", ref, False)):
        shutil.copytree(src, folder)
        save_file(weights, os.path.join(folder, "model.safetensors"))
        if quantized:
            _add_quantization_config(folder, fmt)
    return dst


def _quantize(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if per_channel:
        q, scale = quantize_rows(w)
        return q, scale[:, None]  # (N, 1) as compressed-tensors stores it
    scale = w.abs().max().float() / 448.0
    return (w.float() / scale).to(FP8), scale.reshape(1)


def _add_quantization_config(folder: str, fmt: str) -> None:
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    if fmt == "fp8":
        config["quantization_config"] = {
            "quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"],
        }  # fmt: skip
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "float-quantized",
            "config_groups": {"group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel",
                            "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "token",
                                      "symmetric": True, "dynamic": True},
            }},
            "ignore": ["lm_head"],
        }  # fmt: skip
    with open(path, "w") as f:
        json.dump(config, f)
