"""Effective throughput under an SLA: Dynamic SplitFuse against prefill-first, same engine.

The workload of DeepSpeed-FastGen's evaluation: prompt lengths normal around --prompt-mean
and generation lengths around --gen-mean (30% spread), N closed-loop clients (each sends
its next request when the last one finished). A request meets the SLA when its prompt is
processed at >= --prompt-rate tokens/s (TTFT <= prompt_len / rate) and the exponential
moving average of its generation rate never drops below the threshold (4 tok/s, also 2
and 6 reported). Effective throughput counts only requests that met it.

--path queue (the default): each policy is a deployment served on Redis (the embedded one
unless --redis-url or MII_REDIS_URL), one worker (a --tp group), and every client is a
thread streaming its requests through `mii.client`; times are taken where the client
receives each delta. --path engine: the engine in this process, no queue.

Random weights of a real shape (--preset, `load_format="dummy"`), or a local model folder
(--model). Rows are printed as they finish and written to $OUT/splitfuse.json each time.

    python scripts/bench_splitfuse.py --preset llama-2-70b --tp 4 --clients 1,2,4,8,16,32
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading
import time
from dataclasses import dataclass, field

from bench_common import write_json

from mii.engine.config import SchedulePolicy
from mii.engine.engine import LLMEngine
from mii.engine.sampling_params import SamplingParams

EMA_ALPHA = 0.1
THRESHOLDS = (2.0, 4.0, 6.0)


@dataclass
class Tracked:
    prompt_len: int
    sent: float
    first: float | None = None
    last: float | None = None
    ema: float | None = None
    min_ema: float = float("inf")
    tokens: int = 0

    def on_tokens(self, n: int, now: float) -> None:
        if self.first is None:
            self.first = now
        elif n:
            rate = n / max(now - self.last, 1e-9)
            self.ema = rate if self.ema is None else EMA_ALPHA * rate + (1 - EMA_ALPHA) * self.ema
            self.min_ema = min(self.min_ema, self.ema)
        self.last = now
        self.tokens += n

    def meets(self, prompt_rate: float, gen_rate: float) -> bool:
        ttft_ok = self.first - self.sent <= self.prompt_len / prompt_rate
        return ttft_ok and (self.ema is None or self.min_ema >= gen_rate)


@dataclass
class Workload:
    prompts: list[list[int]]
    gen_lens: list[int]
    cursor: int = 0
    done: list[Tracked] = field(default_factory=list)

    @classmethod
    def make(cls, n, prompt_mean, gen_mean, vocab, seed=0, max_len=4096) -> Workload:
        """Lengths clipped so that prompt + generation fits the context."""
        rng = random.Random(seed)
        gens = [max(4, int(rng.gauss(gen_mean, 0.3 * gen_mean))) for _ in range(n)]
        lengths = [
            min(max_len - gen - 1, max(16, int(rng.gauss(prompt_mean, 0.3 * prompt_mean))))
            for gen in gens
        ]
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(n_tok)] for n_tok in lengths]
        return cls(prompts, gens)


def run(engine: LLMEngine, work: Workload, clients: int, max_requests: int) -> float:
    live: dict[str, Tracked] = {}

    def submit() -> None:
        i = work.cursor
        work.cursor += 1
        rid = f"q{i}"
        params = SamplingParams(max_new_tokens=work.gen_lens[i], ignore_eos=True)
        engine.add_request(rid, work.prompts[i], params)
        live[rid] = Tracked(len(work.prompts[i]), time.perf_counter())

    start = time.perf_counter()
    for _ in range(min(clients, max_requests)):
        submit()
    while live:
        outputs = engine.step()
        now = time.perf_counter()
        for out in outputs:
            req = live[out.request_id]
            req.on_tokens(len(out.token_ids), now)
            if out.finished:
                work.done.append(live.pop(out.request_id))
                if work.cursor < max_requests:
                    submit()
    return time.perf_counter() - start


def run_queue(client, work: Workload, clients: int, max_requests: int, max_len: int) -> float:
    """`clients` threads, each streaming one request at a time through the queue."""
    lock = threading.Lock()
    errors: list[BaseException] = []

    def next_index() -> int | None:
        with lock:
            if work.cursor >= max_requests:
                return None
            work.cursor += 1
            return work.cursor - 1

    def client_loop() -> None:
        try:
            while (i := next_index()) is not None:
                options = dict(
                    max_new_tokens=work.gen_lens[i],
                    max_length=max_len,  # MII's default (1024) would refuse long prompts
                    ignore_eos=True,
                    do_sample=False,
                )
                req = Tracked(len(work.prompts[i]), time.perf_counter())
                for delta in client.stream(work.prompts[i], **options):
                    req.on_tokens(len(delta.token_ids), time.perf_counter())
                with lock:
                    work.done.append(req)
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def model_options(args, policy: SchedulePolicy) -> dict:
    """The ModelConfig fields of both paths."""
    if args.model is None:
        from bench_common import preset_folder

        folder, dummy = preset_folder(args.preset), dict(load_format="dummy")
    else:
        folder, dummy = args.model, {}
    return dict(
        model_name_or_path=folder,
        dtype=args.dtype,
        tensor_parallel=args.tp,
        max_num_batched_tokens=args.budget,
        max_num_seqs=args.max_seqs,
        max_length=args.max_length,
        enable_prefix_caching=False,  # random prompts share nothing; keep the cache honest
        schedule_policy=policy,
        skip_tokenizer_init=True,
        gpu_memory_utilization=args.gpu_memory_utilization,
        **dummy,
    )


def engine_for(args, policy: SchedulePolicy) -> LLMEngine:
    from mii.config import ModelConfig

    model = ModelConfig(**model_options(args, policy))
    return LLMEngine(model.to_engine_config())


def serve_for(args, policy: SchedulePolicy):
    import mii

    return mii.serve(
        deployment_name=f"bench-splitfuse-{policy.value}",
        redis_url=args.redis_url,
        broker={"max_queue_depth": 100_000},
        **model_options(args, policy),
    )


def summarise(work: Workload, seconds: float, prompt_rate: float) -> dict:
    result = {
        "requests": len(work.done),
        "seconds": seconds,
        "queries_per_s": len(work.done) / seconds,
        "tokens_per_s": sum(t.tokens for t in work.done) / seconds,
        "ttft_p50_s": statistics.median(t.first - t.sent for t in work.done),
        "ttft_max_s": max(t.first - t.sent for t in work.done),
        "min_ema_p50": statistics.median(t.min_ema for t in work.done),
    }
    for gen_rate in THRESHOLDS:
        ok = sum(t.meets(prompt_rate, gen_rate) for t in work.done)
        result[f"effective_qps@{gen_rate:g}"] = ok / seconds
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mistral-7b")
    ap.add_argument("--model", default=None, help="a local HF folder instead of a preset")
    ap.add_argument("--path", choices=("queue", "engine"), default="queue")
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=1, help="tensor_parallel of the one worker")
    ap.add_argument("--clients", default="1,2,4,8,16,32")
    ap.add_argument("--requests-per-client", type=int, default=3)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--prompt-mean", type=int, default=2600)
    ap.add_argument("--gen-mean", type=int, default=60)
    ap.add_argument("--prompt-rate", type=float, default=512.0)
    ap.add_argument("--budget", type=int, default=768)
    ap.add_argument("--max-seqs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=4096)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--policies", default="splitfuse,prefill_first")
    args = ap.parse_args()

    rows: list[dict] = []
    for policy in [SchedulePolicy(p) for p in args.policies.split(",")]:
        rows += run_policy(args, policy, rows)
    print_rows(rows)


def run_policy(args, policy: SchedulePolicy, earlier: list[dict]) -> list[dict]:
    built = time.perf_counter()
    if args.path == "queue":
        client = serve_for(args, policy)
        vocab, close = 32000, client.terminate_server  # ids below every preset's vocabulary
        if args.model is not None:
            from mii.engine.loader import load_hf_config, resolve_model_path

            vocab = load_hf_config(resolve_model_path(args.model)).vocab_size

        def drive(work: Workload, clients: int, n: int) -> float:
            return run_queue(client, work, clients, n, args.max_length)
    else:
        engine = engine_for(args, policy)
        vocab, close = engine.vocab_size, engine.close

        def drive(work: Workload, clients: int, n: int) -> float:
            return run(engine, work, clients, n)

    print(f"{policy.value}: ready in {time.perf_counter() - built:.0f}s", flush=True)
    rows = []
    try:
        # compile and autotune outside the timed runs
        drive(Workload.make(2, args.prompt_mean, 4, vocab, seed=99, max_len=args.max_length), 2, 2)
        for clients in [int(c) for c in args.clients.split(",")]:
            n = max(args.min_requests, clients * args.requests_per_client)
            work = Workload.make(
                n, args.prompt_mean, args.gen_mean, vocab, seed=clients, max_len=args.max_length
            )
            seconds = drive(work, clients, n)
            row = {"policy": policy.value, "clients": clients}
            rows.append({**row, **summarise(work, seconds, args.prompt_rate)})
            print_rows(rows[-1:], header=not earlier and len(rows) == 1)
            write_json("splitfuse.json", {"args": vars(args), "rows": earlier + rows})
    finally:
        close()
    return rows


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(
            f"{'policy':<15}{'clients':>8}{'reqs':>6}{'qps':>8}{'tok/s':>9}{'eff@2':>8}"
            f"{'eff@4':>8}{'eff@6':>8}{'ttft p50':>10}",
            flush=True,
        )
    for r in rows:
        print(
            f"{r['policy']:<15}{r['clients']:>8}{r['requests']:>6}{r['queries_per_s']:>8.2f}"
            f"{r['tokens_per_s']:>9.1f}{r['effective_qps@2']:>8.2f}"
            f"{r['effective_qps@4']:>8.2f}{r['effective_qps@6']:>8.2f}"
            f"{r['ttft_p50_s']:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
