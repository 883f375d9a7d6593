"""Tensor parallelism on two GPUs: batch-1 ms/token at TP=2 against TP=1, and offline
throughput of one TP=2 group against two TP=1 replicas, on a random-weight bf16 model of a
real shape (Mistral-7B by default), all in one call.

Every measurement runs in its own spawned process, so each engine starts on empty GPUs and a
TP=2 engine can start its own process group (one per process). The two TP=1 replicas run
at the same time, one per GPU, and start their timed phase together. Prints a short table
last; writes bench_tp_<preset>.json under $OUT when set.

    python scripts/bench_tp.py                  # needs 2 GPUs
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import time
import traceback

import torch
from bench_common import preset_folder, warm_up, write_json
from bench_latency import bench_mii as bench_latency
from bench_offline import random_prompts

from mii.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams

VOCAB = 32000  # ids drawn below every preset's vocabulary size


def build_engine(
    folder: str,
    device_ids: tuple[int, ...],
    max_seqs: int,
    budget: int,
    sync: bool = False,
    quantization: str | None = None,
):
    """A random-weight engine on these GPUs (TP = their number), no tokenizer."""
    tp = len(device_ids)
    config = EngineConfig(
        model=folder,
        dtype="bfloat16",
        device=f"cuda:{device_ids[0]}",
        tensor_parallel=tp,
        device_ids=device_ids if tp > 1 else None,
        async_scheduling=False if sync else None,
        quantization=quantization,
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        cache=CacheConfig(gpu_memory_utilization=0.85, enable_prefix_caching=False),
    )
    torch.cuda.set_device(device_ids[0])
    return LLMEngine(config, random_weights=True, load_tokenizer_files=False)


def latency_job(
    args, folder: str, device_ids: tuple[int, ...], peer_bytes: int = 0, env: dict | None = None
) -> dict:  # fmt: skip
    """Batch-1 latency; `peer_bytes` > 0 sends all-reduces up to that size through the
    one-shot peer path (mii/engine/tp/peer_all_reduce.py), 0 leaves them all to NCCL. `env`:
    settings for this process (and the ranks it starts)."""
    os.environ.update(env or {})
    os.environ["MII_PEER_ALL_REDUCE_MAX_BYTES"] = str(peer_bytes)  # read as the model builds
    engine = build_engine(folder, device_ids, max_seqs=8, budget=2048, sync=args.sync)
    try:
        prompt = random_prompts(1, args.prompt_len, VOCAB)[0]
        return {**bench_latency(engine, prompt, args.new_tokens), "device": _device_name()}
    finally:
        engine.close()


def offline_job(args, folder: str, device_ids: tuple[int, ...], prompts, barrier) -> dict:
    """Warm up, wait for the other replicas, then run every prompt to its last token."""
    engine = build_engine(folder, device_ids, args.max_seqs, args.budget, args.sync)
    try:
        warm_up(engine, prompts, args.offline_new_tokens)
        params = SamplingParams(max_new_tokens=args.offline_new_tokens, ignore_eos=True)
        for i, p in enumerate(prompts):
            engine.add_request(str(i), p, params)
        barrier.wait()
        start, produced = time.time(), 0
        while engine.has_unfinished_requests():
            produced += sum(len(o.token_ids) for o in engine.step())
        torch.cuda.synchronize()
        return {"start": start, "end": time.time(), "output_tokens": produced}
    finally:
        engine.close()


def _device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def _child(conn, job, job_args) -> None:
    try:
        conn.send(("ok", job(*job_args)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


def run_jobs(jobs: list[tuple]) -> list[dict]:
    """Run (function, args) jobs at once, one spawned process each; their results in order."""
    ctx = multiprocessing.get_context("spawn")
    procs, conns = [], []
    for job, job_args in jobs:
        receiver, sender = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(sender, job, job_args))  # not daemonic:
        proc.start()  # a TP=2 engine spawns its own ranks
        procs.append(proc)
        conns.append(receiver)
    results = []
    for proc, conn in zip(procs, conns, strict=True):
        try:
            status, value = conn.recv()
        except EOFError:
            status, value = "error", "the process ended without a result"
        proc.join()
        if status != "ok":
            raise RuntimeError(f"{proc.name} (exit code {proc.exitcode}) failed:\n{value}")
        results.append(value)
    return results


def bench_offline(args, folder: str, groups: list[tuple[int, ...]], prompts) -> dict:
    """Split the prompts over the groups (one process each) and time them together."""
    barrier = multiprocessing.get_context("spawn").Barrier(len(groups))
    shares = [prompts[i :: len(groups)] for i in range(len(groups))]
    jobs = [
        (offline_job, (args, folder, ids, share, barrier))
        for ids, share in zip(groups, shares, strict=True)
    ]
    parts = run_jobs(jobs)
    seconds = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    tokens = sum(p["output_tokens"] for p in parts)
    return {
        "groups": groups,
        "output_tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mistral-7b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--offline-prompt-len", type=int, default=512)
    ap.add_argument("--offline-new-tokens", type=int, default=128)
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--skip-offline", action="store_true")
    ap.add_argument("--peer-bytes", type=int, default=0,
                    help="also time TP=2 with all-reduces up to this size one-shot over peer "
                    "memory (0: NCCL only)")  # fmt: skip
    ap.add_argument("--skip-nccl", action="store_true",
                    help="with --peer-bytes: time TP=2 only with the peer path")  # fmt: skip
    ap.add_argument("--sync", action="store_true", help="no asynchronous scheduling")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:VAR=V,VAR=V",
                    help="with --peer-bytes: also time TP=2 with the peer path under these "
                    "settings (repeatable), e.g. 'apart:MII_PEER_ALL_REDUCE_NORM=0'")  # fmt: skip
    args = ap.parse_args()
    if args.skip_nccl and not args.peer_bytes:
        raise SystemExit("--skip-nccl needs --peer-bytes")
    if torch.cuda.device_count() < 2:  # counts through NVML: this process stays off the GPUs
        raise SystemExit("bench_tp needs two visible GPUs")

    folder = preset_folder(args.preset)
    lat1 = run_jobs([(latency_job, (args, folder, (0,)))])[0]
    result = {"device": lat1["device"], "torch": torch.__version__, "args": vars(args),
              "latency_tp1": lat1}  # fmt: skip
    if not args.skip_nccl:
        lat2 = run_jobs([(latency_job, (args, folder, (0, 1)))])[0]
        result["latency_tp2"] = lat2
        result["latency_ratio"] = lat2["ms_per_token"] / lat1["ms_per_token"]
    if args.peer_bytes:
        peer = run_jobs([(latency_job, (args, folder, (0, 1), args.peer_bytes))])[0]
        result["latency_tp2_peer"] = peer
        result["latency_ratio_peer"] = peer["ms_per_token"] / lat1["ms_per_token"]
        result["variants"] = {}
        for variant in args.variant:
            name, _, settings = variant.partition(":")
            env = dict(kv.split("=", 1) for kv in settings.split(",") if kv)
            job = (latency_job, (args, folder, (0, 1), args.peer_bytes, env))
            result["variants"][name] = {"env": env, **run_jobs([job])[0]}
    if not args.skip_offline:
        prompts = random_prompts(args.requests, args.offline_prompt_len, VOCAB)
        result["offline_tp2"] = bench_offline(args, folder, [(0, 1)], prompts)
        result["offline_2x_tp1"] = bench_offline(args, folder, [(0,), (1,)], prompts)
        result["offline_ratio"] = (
            result["offline_tp2"]["tok_per_s"] / result["offline_2x_tp1"]["tok_per_s"]
        )
    write_json(f"bench_tp_{args.preset}{'_sync' if args.sync else ''}.json", result)
    print_table(result)


def print_table(r: dict) -> None:
    print(f"{r['device']}  {r['args']['preset']}  bf16 random weights")
    print(f"{'batch-1 latency':<26}{'ms/token':>10}{'TTFT ms':>10}")
    rows = [("TP=1", "latency_tp1"), ("TP=2, NCCL", "latency_tp2"),
            ("TP=2, one-shot peer", "latency_tp2_peer")]  # fmt: skip
    for name, key in rows:
        if key in r:
            print(f"{name:<26}{r[key]['ms_per_token']:>10.2f}{r[key]['ttft_ms']:>10.1f}")
    if "latency_ratio" in r:
        print(f"TP=2 / TP=1 = {r['latency_ratio']:.2f}x (target <= 0.60x)")
    variants = r.get("variants", {})
    for name, v in variants.items():
        label = f"TP=2, peer, {name}"
        print(f"{label:<26}{v['ms_per_token']:>10.2f}{v['ttft_ms']:>10.1f}  {v['env']}")
    if "latency_ratio_peer" in r:
        print(f"TP=2 one-shot peer / TP=1 = {r['latency_ratio_peer']:.2f}x")
    for name, v in variants.items():
        ratio = v["ms_per_token"] / r["latency_tp1"]["ms_per_token"]
        print(f"TP=2 peer, {name} / TP=1 = {ratio:.2f}x")
    if "offline_tp2" in r:
        print(f"{'offline throughput':<26}{'tokens':>10}{'seconds':>10}{'tok/s':>10}")
        for name, key in (
            ("one TP=2 group", "offline_tp2"),
            ("two TP=1 replicas", "offline_2x_tp1"),
        ):
            o = r[key]
            print(f"{name:<26}{o['output_tokens']:>10}{o['seconds']:>10.2f}{o['tok_per_s']:>10.0f}")
        print(f"TP=2 group / 2 x TP=1 = {r['offline_ratio']:.2f}x")


if __name__ == "__main__":
    main()
