"""Effective throughput under an SLA: Dynamic SplitFuse against prefill-first, same engine.

The workload of DeepSpeed-FastGen's evaluation: prompt lengths normal around --prompt-mean
and generation lengths around --gen-mean (30% spread), N closed-loop clients (each sends
its next request when the last one finished). A request meets the SLA when its prompt is
processed at >= --prompt-rate tokens/s (TTFT <= prompt_len / rate) and the exponential
moving average of its generation rate never drops below the threshold (4 tok/s, also 2
and 6 reported). Effective throughput counts only requests that met it.

The engine runs in this process (the queue adds a constant per request; see
bench_queue.py). Random weights of a real shape on the GPU (--preset), or a local model
folder (--model) anywhere.
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass, field

from bench_common import write_json

from mii.engine.config import CacheConfig, EngineConfig, SchedulePolicy, SchedulerConfig
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
    def make(cls, n, prompt_mean, gen_mean, vocab, seed=0) -> Workload:
        rng = random.Random(seed)
        lengths = [max(16, int(rng.gauss(prompt_mean, 0.3 * prompt_mean))) for _ in range(n)]
        gens = [max(4, int(rng.gauss(gen_mean, 0.3 * gen_mean))) for _ in range(n)]
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


def engine_for(args, policy: SchedulePolicy) -> LLMEngine:
    random_weights = args.model is None
    if random_weights:
        from bench_common import preset_folder

        folder = preset_folder(args.preset)
    else:
        folder = args.model
    config = EngineConfig(
        model=folder,
        dtype=args.dtype,
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.budget, max_num_seqs=64, policy=policy
        ),
        cache=CacheConfig(enable_prefix_caching=False),
    )
    return LLMEngine(config, random_weights=random_weights, load_tokenizer_files=False)


def summarise(work: Workload, seconds: float, prompt_rate: float) -> dict:
    result = {
        "requests": len(work.done),
        "seconds": seconds,
        "queries_per_s": len(work.done) / seconds,
        "tokens_per_s": sum(t.tokens for t in work.done) / seconds,
    }
    for gen_rate in THRESHOLDS:
        ok = sum(t.meets(prompt_rate, gen_rate) for t in work.done)
        result[f"effective_qps@{gen_rate:g}"] = ok / seconds
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mistral-7b")
    ap.add_argument("--model", default=None, help="a local HF folder instead of a preset")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--clients", default="1,4,8,16,32")
    ap.add_argument("--requests-per-client", type=int, default=4)
    ap.add_argument("--prompt-mean", type=int, default=2600)
    ap.add_argument("--gen-mean", type=int, default=60)
    ap.add_argument("--prompt-rate", type=float, default=512.0)
    ap.add_argument("--budget", type=int, default=768)
    args = ap.parse_args()

    rows = []
    for policy in (SchedulePolicy.SPLITFUSE, SchedulePolicy.PREFILL_FIRST):
        engine = engine_for(args, policy)
        vocab = engine.vocab_size
        for clients in [int(c) for c in args.clients.split(",")]:
            n = clients * args.requests_per_client
            work = Workload.make(n, args.prompt_mean, args.gen_mean, vocab, seed=clients)
            seconds = run(engine, work, clients, n)
            rows.append(
                {
                    "policy": policy.value,
                    "clients": clients,
                    **summarise(work, seconds, args.prompt_rate),
                }
            )
        engine.close()
        del engine
    write_json("splitfuse.json", {"args": vars(args), "rows": rows})
    print(f"{'policy':<15}{'clients':>8}{'qps':>8}{'eff@2':>8}{'eff@4':>8}{'eff@6':>8}")
    for r in rows:
        print(
            f"{r['policy']:<15}{r['clients']:>8}{r['queries_per_s']:>8.2f}"
            f"{r['effective_qps@2']:>8.2f}{r['effective_qps@4']:>8.2f}"
            f"{r['effective_qps@6']:>8.2f}"
        )


if __name__ == "__main__":
    main()
