"""Offline throughput on the GPU: random-weight model of a real shape, fixed-length requests.

Runs, in one process: the device's peak matmul rate and copy bandwidth; transformers'
static batching (`generate` on batches of --hf-batch); then mii's engine on all requests.
Reports output tok/s for both, their ratio, and the engine's roofline efficiency.
`--kv-cache-dtype fp8` runs the engine over an fp8 KV cache (twice the blocks: the JSON and
the kv-blocks line say how many).
"""

from __future__ import annotations

import argparse
import gc
import random

import torch
from bench_common import (
    ModelShape,
    Roofline,
    Timer,
    attach_roofline,
    fp8_matmul_flops,
    hf_model,
    measure_peaks,
    preset_folder,
    switches,
    warm_up,
    write_json,
    write_text,
)

from mii.engine.config import KV_CACHE_DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams


def kv_suffix(kv_cache_dtype: str) -> str:
    """The result file's mark of a KV cache other than the model's dtype."""
    return "" if kv_cache_dtype == "auto" else "_kv_fp8"


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def bench_hf(preset: str, prompts, new_tokens: int, batch: int) -> dict:
    model = hf_model(preset)
    ids = torch.tensor(prompts[:batch], device="cuda")
    model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
    produced = 0
    with Timer() as t:
        for lo in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[lo : lo + batch], device="cuda")
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
            )
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {
        "requests": len(prompts),
        "output_tokens": produced,
        "seconds": t.seconds,
        "tok_per_s": produced / t.seconds,
    }


def build_engine(
    preset: str,
    budget: int,
    max_seqs: int,
    eager: bool,
    sync: bool = False,
    quantization: str | None = None,
    kv_cache_dtype: str = "auto",
) -> LLMEngine:
    config = EngineConfig(
        model=preset_folder(preset),
        dtype="bfloat16",
        quantization=quantization,
        enforce_eager=eager,
        async_scheduling=False if sync else None,
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        cache=CacheConfig(
            gpu_memory_utilization=0.9, enable_prefix_caching=False, kv_cache_dtype=kv_cache_dtype
        ),
    )
    return LLMEngine(config, random_weights=True, load_tokenizer_files=False)


def _profiled_steps(engine: LLMEngine, steps: int) -> int:
    """Run steps under the torch profiler; write the kernel table (GPU time vs wall)."""
    from torch.profiler import ProfilerActivity, profile

    produced = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            produced += sum(len(o.token_ids) for o in engine.step())
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
    write_text(f"profile_step{engine.stats().steps}.txt", table)
    return produced


def bench_mii(
    engine: LLMEngine,
    prompts,
    new_tokens: int,
    roofline: Roofline | None,
    profile_at: int | None = None,
) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    warm_up(engine, prompts, new_tokens)
    if roofline is not None:
        attach_roofline(engine, roofline)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    produced, first_step = 0, engine.stats().steps
    with Timer() as t:
        while engine.has_unfinished_requests():
            if profile_at is not None and engine.stats().steps - first_step == profile_at:
                produced += _profiled_steps(engine, 10)
            produced += sum(len(o.token_ids) for o in engine.step())
    return {
        "requests": len(prompts),
        "output_tokens": produced,
        "seconds": t.seconds,
        "tok_per_s": produced / t.seconds,
        "steps": engine.stats().steps - first_step,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mistral-7b")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--hf-requests", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--max-seqs", type=int, default=512)
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--sync", action="store_true", help="no asynchronous scheduling (the baseline for it)"
    )
    ap.add_argument("--profile-at", type=int, default=None, help="profile 10 steps from here")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="FP8 weights")
    args = ap.parse_args()

    peaks = measure_peaks()
    if args.quantization == "fp8":  # the linear layers' floor at the float8 rate
        peaks["fp8_matmul_flops"] = fp8_matmul_flops()
    cls_vocab = 32000
    prompts = random_prompts(args.requests, args.prompt_len, cls_vocab)
    hf = None
    if not args.skip_hf:
        hf = bench_hf(args.preset, prompts[: args.hf_requests], args.new_tokens, args.hf_batch)
    engine = build_engine(
        args.preset, args.budget, args.max_seqs, args.eager, args.sync, args.quantization,
        args.kv_cache_dtype,
    )  # fmt: skip
    shape = ModelShape.of(engine.runner.model, engine.hf_config)
    shape.dtype_bytes = engine.runner.kv_dtype.itemsize  # the KV cache's bytes per element
    roofline = Roofline(shape, peaks, linear_flops_per_s=peaks.get("fp8_matmul_flops"))
    ours = bench_mii(engine, prompts, args.new_tokens, roofline, args.profile_at)
    ours["roofline_floor_s"] = roofline.floor_s
    ours["steps_by_kind"] = roofline.step_table()
    ours["efficiency"] = roofline.floor_s / ours["seconds"]
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "args": vars(args),
        "peaks": peaks,
        "hf_static": hf,
        "mii": ours,
        "kv_blocks": engine.runner.num_blocks,
        "kv_cache_dtype": str(engine.runner.kv_dtype),
    }
    if hf:
        result["ratio_vs_hf"] = ours["tok_per_s"] / hf["tok_per_s"]
    suffix = ("_sync" if args.sync else "") + (f"_{args.quantization}" if args.quantization else "")
    suffix += kv_suffix(args.kv_cache_dtype)
    write_json(f"offline_{args.preset}{suffix}.json", result)
    fp8_peak = peaks.get("fp8_matmul_flops")
    print(
        f"device {result['device']}  matmul {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s  "
        + (f"fp8 matmul {fp8_peak / 1e12:.0f} TFLOP/s  " if fp8_peak else "")
        + f"copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s  kv blocks {result['kv_blocks']}"
    )
    print(f"switches {switches() or 'none set'}")
    print(f"{'engine':<14}{'requests':>9}{'tokens':>9}{'seconds':>9}{'tok/s':>9}")
    for name, r in (("hf static", hf), ("mii", ours)):
        if r:
            print(
                f"{name:<14}{r['requests']:>9}{r['output_tokens']:>9}{r['seconds']:>9.2f}"
                f"{r['tok_per_s']:>9.0f}"
            )
    print(
        f"mii roofline efficiency {ours['efficiency']:.2f} over {ours['steps']} steps"
        + (f"; {result['ratio_vs_hf']:.1f}x hf static" if hf else "")
    )
    print(f"{'steps':<34}{'count':>6}{'tokens':>8}{'decodes':>8}{'device ms':>10}{'floor ms':>9}")
    for row in ours["steps_by_kind"]:
        print(
            f"{row['kind']:<34}{row['steps']:>6}{row['tokens'] / row['steps']:>8.0f}"
            f"{row['decodes'] / row['steps']:>8.0f}{row['device_ms']:>10.0f}{row['floor_ms']:>9.0f}"
        )


if __name__ == "__main__":
    main()
