"""Batch-1 latency on the GPU: ms per output token and time to first token.

One request of --prompt-len random tokens generating --new-tokens, on a random-weight model
of a real shape; transformers' `generate` on the same shape in the same process; the floor
is the weights' bytes over the copy bandwidth measured in the same run. `--sliding-window`
replaces the preset's window (0: none), so that one shape runs with and without it
(Mistral-7B at 16k context: `--preset mistral-7b-v0.1 --prompt-len 16384`).
`--kv-cache-dtype fp8` decodes over an fp8 KV cache (the split-K kernel reads half the
bytes; long prompts show it). It also prints the engine's start-up time (random weights,
CUDA graph capture and, unless `--no-warm-up`, the warm-up).

`--knock-out norms,rope,attention,gemv` times the token with those kernels replaced by
stand-ins that launch nothing (the tokens are meaningless): each class's share of the
token in the chain as it runs, which a profile of kernels launched with PDL cannot give
(their spans overlap).
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from bench_common import (
    ModelShape,
    Timer,
    hf_model,
    measure_peaks,
    preset_folder,
    replay_ms,
    switches,
    write_json,
)
from bench_offline import _profiled_steps, kv_suffix, random_prompts

from mii.engine.config import KV_CACHE_DTYPES, CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams
from mii.kernels import dispatch

KNOCK_OUTS = ("norms", "rope", "attention", "gemv")


def knock_out(classes: list[str]) -> None:
    """Replace the dispatch functions of these kernel classes with launch-free stand-ins
    of the same shapes (before the engine captures its graphs)."""
    unknown = set(classes) - set(KNOCK_OUTS)
    if unknown:
        raise SystemExit(f"--knock-out: unknown {sorted(unknown)}; choose from {KNOCK_OUTS}")
    if "norms" in classes:
        dispatch.rms_norm = lambda x, *args, **kwargs: (x, x)
    if "rope" in classes:
        dispatch.rope_kv_write = lambda *args, **kwargs: None
    if "attention" in classes:
        dispatch.paged_attention = lambda q, *args, **kwargs: torch.empty_like(q)
    if "gemv" in classes:
        dispatch.gemv = lambda x, weight, *args, **kwargs: x.new_empty(
            (x.shape[0], weight.shape[0])
        )


def bench_hf(preset: str, prompt, new_tokens: int, overrides: dict) -> float:
    model = hf_model(preset, **overrides)
    ids = torch.tensor([prompt], device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    with Timer() as short:
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
    with Timer() as full:
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return (full.seconds - short.seconds) / (new_tokens - 1) * 1e3


def graph_replay_ms(engine: LLMEngine, replays: int = 200) -> float | None:
    """ms per back-to-back replay of the batch-1 decode graph on its last step's inputs:
    the token's GPU chain alone, without the engine's work between steps (sampling, the
    step's inputs, the replay's launch). None without graphs."""
    graphs = getattr(engine.runner, "graphs", None)
    if graphs is None or 1 not in graphs.graphs:
        return None
    graph = graphs.graphs[1]
    for _ in range(10):
        graph.replay()
    return replay_ms(graph, replays)


def bench_mii(engine: LLMEngine, prompt, new_tokens: int, repeats: int = 3) -> dict:
    """Median of `repeats` runs after a warm-up. Each run's prompt is `prompt` with its
    tokens shifted by the run's number: no run's prefill hits the prefix cache that the
    runs before it filled (TTFT is then a whole prefill, not one block's)."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    vocab = engine.hf_config.vocab_size
    runs = []
    for r in range(repeats + 1):  # the first run warms up (kernel compiles, graph capture)
        engine.add_request(f"r{r}", [(t + r) % vocab for t in prompt], params)
        torch.cuda.synchronize()
        start = time.perf_counter()
        stamps = []
        while engine.has_unfinished_requests():
            if engine.step():
                stamps.append(time.perf_counter())
        ttft = stamps[0] - start
        per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
        runs.append((ttft * 1e3, per_token * 1e3))
    engine.add_request("profiled", prompt, params)
    for _ in range(20):
        engine.step()
    _profiled_steps(engine, 10)
    while engine.has_unfinished_requests():
        engine.step()
    runs = sorted(runs[1:], key=lambda x: x[1])
    ttft, per_token = runs[len(runs) // 2]
    return {"ttft_ms": ttft, "ms_per_token": per_token}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mistral-7b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--hf-new-tokens", type=int, default=64)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument(
        "--sync", action="store_true", help="no asynchronous scheduling (the baseline for it)"
    )
    ap.add_argument("--sliding-window", type=int, default=None, help="0: no window")
    ap.add_argument("--quantization", choices=["fp8"], default=None, help="FP8 weights")
    ap.add_argument(
        "--no-warm-up", action="store_true", help="build the engine without its warm-up"
    )
    ap.add_argument(
        "--knock-out", default="", help=f"comma-separated of {KNOCK_OUTS}: launch nothing"
    )
    args = ap.parse_args()
    knocked = [c for c in args.knock_out.split(",") if c]
    knock_out(knocked)

    overrides = {}
    if args.sliding_window is not None:
        overrides["sliding_window"] = args.sliding_window or None
    peaks = measure_peaks()
    prompt = random_prompts(1, args.prompt_len, 32000)[0]
    hf_ms = None
    if not args.skip_hf:
        hf_ms = bench_hf(args.preset, prompt, args.hf_new_tokens, overrides)
    config = EngineConfig(
        model=preset_folder(args.preset, **overrides),
        dtype="bfloat16",
        quantization=args.quantization,
        enforce_eager=args.eager,
        async_scheduling=False if args.sync else None,
        warm_up=False if args.no_warm_up else None,
        scheduler=SchedulerConfig(max_num_batched_tokens=2048, max_num_seqs=64),
        cache=CacheConfig(gpu_memory_utilization=0.5, kv_cache_dtype=args.kv_cache_dtype),
    )
    with Timer() as start_up:  # weights, graph capture and the warm-up
        engine = LLMEngine(config, random_weights=True, load_tokenizer_files=False)
    shape = ModelShape.of(engine.runner.model, engine.hf_config)
    floor_ms = shape.weight_bytes / peaks["copy_bytes_per_s"] * 1e3
    ours = bench_mii(engine, prompt, args.new_tokens)
    replay_ms = graph_replay_ms(engine)
    window = getattr(engine.hf_config, "sliding_window", None)
    result = {
        "device": torch.cuda.get_device_name(),
        "args": vars(args),
        "sliding_window": window,
        "kv_cache_dtype": str(engine.runner.kv_dtype),
        "prompt_len": args.prompt_len,
        "peaks": peaks,
        "floor_ms": floor_ms,
        "hf_ms_per_token": hf_ms,
        **ours,
        "ratio_to_floor": ours["ms_per_token"] / floor_ms,
        "graph_replay_ms": replay_ms,
        "start_up_s": start_up.seconds,
    }
    suffix = ("_sync" if args.sync else "") + (f"_{args.quantization}" if args.quantization else "")
    if args.sliding_window is not None:
        suffix += f"_ctx{args.prompt_len}_window{args.sliding_window}"
    suffix += kv_suffix(args.kv_cache_dtype) + "".join(f"_no_{c}" for c in knocked)
    write_json(f"latency_{args.preset}{suffix}.json", result)
    print(
        f"device {result['device']}  copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s  "
        f"{args.preset}  prompt {args.prompt_len}  window {window}  "
        f"kv cache {engine.runner.kv_dtype}"
    )
    print(f"switches {switches() or 'none set'}")
    if knocked:
        print(f"knocked out (launch nothing; tokens meaningless): {', '.join(knocked)}")
    print(f"{'what':<22}{'ms/token':>10}{'TTFT ms':>10}")
    if hf_ms:
        print(f"{'hf generate':<22}{hf_ms:>10.2f}{'':>10}")
    print(f"{'mii':<22}{ours['ms_per_token']:>10.2f}{ours['ttft_ms']:>10.2f}")
    if replay_ms is not None:
        print(f"{'decode graph alone':<22}{replay_ms:>10.2f}")
    print(f"{'weight floor':<22}{floor_ms:>10.2f}")
    print(f"mii / floor = {result['ratio_to_floor']:.2f}x")
    print(f"engine start-up {start_up.seconds:.1f} s (random weights, graphs, warm-up)")


if __name__ == "__main__":
    main()
