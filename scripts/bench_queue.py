"""The "queue" workload: the same requests through `mii.serve` (client -> Redis stream ->
worker -> response stream) and through `mii.pipeline` in-process, in one run; then the
broker path alone with the fast fake engine (what one worker publishes).

    python scripts/bench_queue.py [--model smollm2] [--requests 32] [--new-tokens 32]
                                  [--fake-requests 512] [--fake-tokens 64] [--json out.json]

Redis: --redis-url, else MII_REDIS_URL, else 127.0.0.1:6379, else an embedded one.
Prints a table last; writes all numbers as JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid

import mii
from mii.broker_config.deployment import read_workers
from mii.config import MIIConfig
from mii.launch.serve import serve_deployment
from mii.params import GenerateParams, encode_prompt

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_DIR = os.path.join(os.path.dirname(HERE), "tests", "worker")  # the fake engine

TOPICS = ["the ocean", "a robot", "coffee", "mountains", "jazz", "the moon", "bread", "chess"]


def prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % 8]} (variant {i})." for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def summary(first: dict, done: dict, tokens: int, t0: float) -> dict:
    ttft = [first[r] - t0 for r in first]
    wall = max(done.values()) - t0
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile(ttft, 0.5),
        "ttft_p99_ms": 1000 * percentile(ttft, 0.99),
    }


def run_pipeline(pipe, texts: list[str], options: dict) -> dict:
    """All requests enter the engine at t0; time each one's first token and the end."""
    engine, params = pipe.engine, GenerateParams.from_kwargs(**options)
    t0 = time.perf_counter()
    for text in texts:
        ids = encode_prompt(pipe.tokenizer, text)
        sampling = params.to_sampling_params(len(ids), engine.max_model_len)
        engine.add_request(uuid.uuid4().hex, ids, sampling)
    first, done, tokens = {}, {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            now = time.perf_counter()
            first.setdefault(out.request_id, now)
            tokens += len(out.token_ids)
            if out.finished:
                done[out.request_id] = now
    return summary(first, done, tokens, t0)


def run_served(client, texts: list[str], options: dict) -> dict:
    """The same through the queue: one submit of all prompts, then read every stream."""
    t0 = time.perf_counter()
    requests = client.submit(texts, **options)
    first, done, tokens = {}, {}, 0
    for request, delta in requests:
        now = time.perf_counter()
        first.setdefault(request.rid, now)
        tokens += len(delta.token_ids)
        if request.done:
            done[request.rid] = now
    client._cleanup(requests)
    return summary(first, done, tokens, t0)


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def bench_model(args) -> dict:
    """Both paths loaded side by side and run in alternation (this machine is shared, so
    its speed drifts): the median round of each is compared."""
    texts = prompts(args.requests)
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
    model_kw = dict(num_kv_blocks=1024)
    pipe = mii.pipeline(args.model, **model_kw)
    client = mii.serve(
        args.model,
        deployment_name="bench-queue",
        redis_url=args.redis_url,
        # admit all at once, as the pipeline does; report stats often
        broker={"admit_batch": args.requests, "heartbeat_interval_s": 0.5},
        **model_kw,
    )
    try:
        warm = dict(options, max_new_tokens=2)
        pipe(texts, **warm)
        client.generate(texts, **warm)
        rounds = [
            (run_pipeline(pipe, texts, options), run_served(client, texts, options))
            for _ in range(args.rounds)
        ]
        loop_stats = worker_stats(client)
    finally:
        client.terminate_server()
        pipe.destroy()
    pipeline, served = median_run([p for p, _ in rounds]), median_run([s for _, s in rounds])
    return {
        "rounds": [{"pipeline": p, "serve": s} for p, s in rounds],
        "pipeline": pipeline,
        "serve": served,
        "throughput_ratio": served["tokens_per_s"] / pipeline["tokens_per_s"],
        "round_ratios": [s["tokens_per_s"] / p["tokens_per_s"] for p, s in rounds],
        "added_ttft_p50_ms": served["ttft_p50_ms"] - pipeline["ttft_p50_ms"],
        "added_ttft_p99_ms": served["ttft_p99_ms"] - pipeline["ttft_p99_ms"],
        "worker_loop": loop_stats,
        "worker_loop_overhead": 1 - loop_stats["step_s"] / loop_stats["busy_s"],
    }


def worker_stats(client) -> dict:
    """The worker's own account: wall time busy, and how much of it was engine steps."""
    time.sleep(1.0)  # its status refreshes every heartbeat
    (status,) = read_workers(client.redis, client.keys).values()
    return status["stats"]


def bench_broker(args) -> dict:
    """One worker with the fake engine (no compute): the queue's own ceiling. Measured
    twice: with this process idle until the worker acknowledged everything (what the worker
    publishes), and with this process reading every delta (the whole path)."""
    os.environ["PYTHONPATH"] = os.pathsep.join([FAKE_DIR, os.environ.get("PYTHONPATH", "")])
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "max_length": 4096},
        deployment_name="bench-broker",
        redis_url=args.redis_url,
        broker={"admit_batch": 256, "max_queue_depth": 100_000},
    )
    client = serve_deployment(config, engine_factory="fake_engine:make_fake_engine")
    try:
        client.generate(["warm"], max_new_tokens=4)
        texts = [f"request {i}" for i in range(args.fake_requests)]
        n_tokens = args.fake_requests * args.fake_tokens
        worker = _timed(lambda: _until_acked(client, texts, args.fake_tokens))
        path = _timed(lambda: _read_everything(client, texts, args.fake_tokens))
    finally:
        client.terminate_server()
    return {
        "requests": args.fake_requests,
        "tokens": n_tokens,
        "worker_wall_s": worker,
        "worker_requests_per_s": args.fake_requests / worker,
        "worker_tokens_per_s": n_tokens / worker,
        "end_to_end_wall_s": path,
        "end_to_end_tokens_per_s": n_tokens / path,
    }


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _until_acked(client, texts: list[str], new_tokens: int) -> None:
    requests = client.submit(texts, max_new_tokens=new_tokens)
    while client.redis.xlen(client.keys.requests):  # acked entries are deleted
        time.sleep(0.005)
    client._cleanup(requests)


def _read_everything(client, texts: list[str], new_tokens: int) -> None:
    requests = client.submit(texts, max_new_tokens=new_tokens)
    tokens = sum(len(d.token_ids) for _, d in requests)
    assert tokens == len(texts) * new_tokens
    client._cleanup(requests)


def print_table(results: dict) -> None:
    model, broker = results.get("model"), results.get("broker")
    print("\nqueue benchmark (2-core CPU unless noted)")
    if model:
        p, s = model["pipeline"], model["serve"]
        print(f"{'path':<12}{'tok/s':>10}{'TTFT p50 ms':>14}{'TTFT p99 ms':>14}")
        print(
            f"{'pipeline':<12}{p['tokens_per_s']:>10.1f}{p['ttft_p50_ms']:>14.1f}{p['ttft_p99_ms']:>14.1f}"
        )
        print(
            f"{'serve':<12}{s['tokens_per_s']:>10.1f}{s['ttft_p50_ms']:>14.1f}{s['ttft_p99_ms']:>14.1f}"
        )
        print(
            f"throughput ratio serve/pipeline {model['throughput_ratio']:.3f} (rounds: "
            f"{', '.join(f'{r:.2f}' for r in model['round_ratios'])}); added TTFT "
            f"p50 {model['added_ttft_p50_ms']:+.1f} ms, p99 {model['added_ttft_p99_ms']:+.1f} ms"
        )
        print(
            f"worker loop: {100 * model['worker_loop_overhead']:.2f}% of its busy time outside "
            "engine.step() (reads, bookkeeping, handing chunks to the publisher thread)"
        )
    if broker:
        shape = f"{broker['requests']} requests x {broker['tokens'] // broker['requests']} tokens"
        print(f"broker alone, fake engine, 1 worker ({shape}):")
        print(
            f"  worker publishes {broker['worker_requests_per_s']:.0f} requests/s, "
            f"{broker['worker_tokens_per_s']:.0f} tokens/s"
        )
        print(
            f"  with a client reading every delta: {broker['end_to_end_tokens_per_s']:.0f} tokens/s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each path")
    parser.add_argument("--fake-requests", type=int, default=512)
    parser.add_argument("--fake-tokens", type=int, default=64)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"args": vars(args)}
    if not args.skip_model:
        results["model"] = bench_model(args)
    results["broker"] = bench_broker(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print_table(results)


if __name__ == "__main__":
    main()
