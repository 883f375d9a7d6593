"""Bulk jobs, measured: interactive latency while a bulk job runs against an idle worker,
and a bulk job's throughput against `mii.pipeline` on the same prompts.

    python scripts/bench_bulk.py [--model smollm2] [--lines 64] [--new-tokens 32]
                                 [--interactive 12] [--rounds 2] [--json out.json]

One deployment (one worker) and one in-process pipeline are loaded side by side; each
idles while the other runs. Interactive latency: time to the first streamed token of
short requests sent one after another, first to the idle worker, then while a bulk job
keeps it busy. Throughput: generated tokens per second of the whole job (submit to last
result) against the pipeline on the same prompts, in alternating rounds (median).
Redis: --redis-url, else MII_REDIS_URL, else 127.0.0.1:6379, else an embedded one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import mii
from mii.producer.bulk.jobs import BulkJobs, read_input

TOPICS = ["the ocean", "a robot", "coffee", "mountains", "jazz", "the moon", "bread", "chess"]


def bulk_prompts(n: int) -> list[str]:
    return [f"Write a short story about {TOPICS[i % 8]} (variant {i})." for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def ttft_ms(client, n: int, busy=lambda: True) -> list[float]:
    """Time to the first token of `n` short requests, one after another, while `busy()`."""
    samples = []
    for i in range(n):
        if not busy():
            break
        t0 = time.perf_counter()
        stream = client.stream(f"Question {i}: what is {i} plus {i}?", max_new_tokens=4)
        next(stream)
        samples.append(1000 * (time.perf_counter() - t0))
        stream.close()
    return samples


def latency_stats(samples: list[float]) -> dict:
    return {
        "n": len(samples),
        "p50_ms": percentile(samples, 0.5),
        "p99_ms": percentile(samples, 0.99),
        "max_ms": max(samples),
    }


def run_job(bulk: BulkJobs, lines: list[str], job_id: str, options: dict, during=None) -> dict:
    """Submit, optionally do `during(status)` while it runs, wait; the job's own numbers."""
    t0 = time.perf_counter()
    status = bulk.submit(read_input(lines), job_id=job_id, params=options, ttl_s=3600)
    extra = during(lambda: not bulk.status(status.job_id).complete) if during else None
    status = bulk.wait(status.job_id, poll_s=0.05)
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": status.tokens, "tokens_per_s": status.tokens / wall}, extra


def run_pipeline(pipe, prompts: list[str], options: dict) -> dict:
    t0 = time.perf_counter()
    tokens = sum(r.generated_length for r in pipe(prompts, **options))
    wall = time.perf_counter() - t0
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def bench(args) -> dict:
    prompts = bulk_prompts(args.lines)
    lines = [json.dumps({"prompt": p, "id": f"l{i}"}) for i, p in enumerate(prompts)]
    options = dict(max_new_tokens=args.new_tokens, do_sample=False, ignore_eos=True)
    model_kw = dict(num_kv_blocks=1024, max_num_seqs=args.max_num_seqs)
    pipe = mii.pipeline(args.model, **model_kw)
    broker = {"admit_batch": args.admit_batch} if args.admit_batch else {}
    client = mii.serve(
        args.model,
        deployment_name="bench-bulk",
        redis_url=args.redis_url,
        broker=broker,
        **model_kw,
    )
    bulk, tag = BulkJobs(client), f"{int(time.time())}"
    try:
        pipe(prompts[:4], max_new_tokens=2)
        client.generate(prompts[:4], max_new_tokens=2)
        idle = ttft_ms(client, args.interactive)
        _, loaded = run_job(
            bulk, lines, f"bench-{tag}-load", options, lambda busy: ttft_ms(client, 10**6, busy)
        )
        rounds = []
        for r in range(args.rounds):
            p = run_pipeline(pipe, prompts, options)
            b, _ = run_job(bulk, lines, f"bench-{tag}-{r}", options)
            rounds.append((p, b))
    finally:
        client.terminate_server()
        pipe.destroy()
    pipeline, served = median_run([p for p, _ in rounds]), median_run([b for _, b in rounds])
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU",
        "interactive_idle": latency_stats(idle),
        "interactive_during_bulk": latency_stats(loaded),
        "pipeline": pipeline,
        "bulk": served,
        "throughput_ratio": served["tokens_per_s"] / pipeline["tokens_per_s"],
        "rounds": [{"pipeline": p, "bulk": b} for p, b in rounds],
    }


def print_table(args, results: dict) -> None:
    idle, busy = results["interactive_idle"], results["interactive_during_bulk"]
    print(f"\nbulk benchmark: {args.model}, {results['machine']}")
    seqs = f", max_num_seqs {args.max_num_seqs}" if args.max_num_seqs else ""
    seqs += f", admit_batch {args.admit_batch}" if args.admit_batch else ""
    print(f"{args.lines} lines x {args.new_tokens} tokens (greedy, ignore_eos); 1 worker{seqs}")
    print(f"{'interactive TTFT':<26}{'n':>4}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}")
    for name, s in (("idle worker", idle), ("during a bulk job", busy)):
        print(f"{name:<26}{s['n']:>4}{s['p50_ms']:>10.1f}{s['p99_ms']:>10.1f}{s['max_ms']:>10.1f}")
    print(f"{'throughput':<26}{'tok/s':>14}{'wall s':>10}")
    for name in ("pipeline", "bulk"):
        r = results[name]
        print(f"{name:<26}{r['tokens_per_s']:>14.1f}{r['wall_s']:>10.2f}")
    ratios = [b["tokens_per_s"] / p["tokens_per_s"] for p, b in
              ((x["pipeline"], x["bulk"]) for x in results["rounds"])]  # fmt: skip
    print(
        f"bulk/pipeline {results['throughput_ratio']:.3f} "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--lines", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--interactive", type=int, default=12, help="idle TTFT samples")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--admit-batch", type=int, default=None, help="worker reads per poll")
    parser.add_argument(
        "--max-num-seqs", type=int, default=None, help="engine limit (below --lines: saturated)"
    )
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = {"args": vars(args), **bench(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print_table(args, results)


if __name__ == "__main__":
    main()
