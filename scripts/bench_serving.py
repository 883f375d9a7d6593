"""Serving benchmark over the OpenAI protocol, in the style of vLLM's `benchmark_serving`.

Requests arrive at a Poisson rate (`--request-rate`, inf: all at once) under an optional
concurrency cap (`--max-concurrency`); prompts are random token ids of synthetic lengths
(`--input-len`, `--output-len`, `--range-ratio`) or lengths read from a JSONL
(`--dataset`, lines `{"input_len": .., "output_len": ..}` or `{"prompt": "..",
"output_len": ..}`). Output lengths are fixed with `ignore_eos` (vLLM's extension; drop it
with `--no-ignore-eos`). Reported: request/s, output tok/s, TTFT, TPOT and inter-token
latency p50/p99; full numbers as JSON (`--json`), a short table printed last.

Any OpenAI-compatible server:
    python scripts/bench_serving.py --base-url http://host:8000 --model NAME
The gateway against `mii.client` on the same deployment, same requests, one run:
    python scripts/bench_serving.py --base-url http://host:8000 --model DEP --compare-client DEP
Self-contained (starts a deployment and its gateway, runs both, stops them):
    python scripts/bench_serving.py --launch smollm2 --num-requests 64 --max-concurrency 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import statistics
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Request:
    prompt: list[int] | str
    output_len: int


@dataclass
class Result:
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


# ---- workload -----------------------------------------------------------------------------
def synthetic(args, rng: random.Random) -> list[Request]:
    def length(mean: int) -> int:
        low = max(1, int(mean * (1 - args.range_ratio)))
        return rng.randint(low, max(low, int(mean * (1 + args.range_ratio))))

    return [
        Request([rng.randrange(100, args.vocab_size) for _ in range(length(args.input_len))],
                length(args.output_len))
        for _ in range(args.num_requests)
    ]  # fmt: skip


def from_jsonl(args, rng: random.Random) -> list[Request]:
    with open(args.dataset, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    requests = []
    for row in rows[: args.num_requests]:
        prompt = row.get("prompt") or [rng.randrange(100, args.vocab_size)
                                       for _ in range(int(row["input_len"]))]  # fmt: skip
        requests.append(Request(prompt, int(row.get("output_len", args.output_len))))
    return requests


# ---- the two ways to send a request ---------------------------------------------------------
class OpenAIHTTP:
    """Streams `/v1/completions` and times the server-sent events."""

    name = "http"

    def __init__(self, base_url: str, model: str, api_key: str | None, ignore_eos: bool):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.http = httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits,
                                      timeout=httpx.Timeout(600.0))  # fmt: skip
        self.model, self.ignore_eos = model, ignore_eos

    async def send(self, request: Request) -> Result:
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": request.output_len,
                "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.ignore_eos:
            body["ignore_eos"] = True
        result, start, last = Result(), time.perf_counter(), None
        async with self.http.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                result.error = f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}"
                return result
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    last = _tick(result, start, last)
        result.e2e = time.perf_counter() - start
        return result

    async def close(self) -> None:
        await self.http.aclose()


class MiiClient:
    """The same request through `mii.client(...).astream`, no HTTP."""

    name = "client"

    def __init__(self, deployment: str, redis_url: str | None, ignore_eos: bool):
        import mii

        self.client = mii.client(deployment, redis_url=redis_url)
        self.ignore_eos = ignore_eos

    async def send(self, request: Request) -> Result:
        options = dict(max_new_tokens=request.output_len, do_sample=False,
                       ignore_eos=self.ignore_eos)  # fmt: skip
        result, start, last = Result(), time.perf_counter(), None
        async for delta in self.client.astream(request.prompt, **options):
            if delta.generated_text:
                last = _tick(result, start, last)
            result.output_tokens = delta.generated_length
        result.e2e = time.perf_counter() - start
        return result

    async def close(self) -> None:
        pass


def _tick(result: Result, start: float, last: float | None) -> float:
    now = time.perf_counter()
    if last is None:
        result.ttft = now - start
    else:
        result.itl.append(now - last)
    return now


# ---- running --------------------------------------------------------------------------------
async def run(sender, requests: list[Request], rate: float, concurrency: int | None, seed: int):
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency or len(requests))

    async def one(request: Request) -> Result:
        async with gate:
            try:
                return await sender.send(request)
            except Exception as exc:  # noqa: BLE001 (reported per request)
                return Result(error=f"{type(exc).__name__}: {exc}")

    tasks, start = [], time.perf_counter()
    for request in requests:
        tasks.append(asyncio.create_task(one(request)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    results = await asyncio.gather(*tasks)
    return summarize(sender.name, results, time.perf_counter() - start)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] * 1000  # ms


def summarize(name: str, results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.error is None]
    tokens = sum(r.output_tokens for r in ok)
    ttft, itl = [r.ttft for r in ok], [x for r in ok for x in r.itl]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    return {
        "name": name, "requests": len(results), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5], "wall_s": wall_s,
        "request_per_s": len(ok) / wall_s, "output_tok_per_s": tokens / wall_s,
        "output_tokens": tokens,
        "ttft_ms": {"mean": statistics.fmean(ttft) * 1000 if ttft else None,
                    "p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "tpot_ms": {"p50": _pct(tpot, 50), "p99": _pct(tpot, 99)},
        "itl_ms": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
        "e2e_ms": {"p50": _pct([r.e2e for r in ok], 50), "p99": _pct([r.e2e for r in ok], 99)},
    }  # fmt: skip


def compare(http: dict, client: dict) -> dict:
    return {
        "throughput_ratio": http["output_tok_per_s"] / client["output_tok_per_s"],
        "added_ttft_p50_ms": http["ttft_ms"]["p50"] - client["ttft_ms"]["p50"],
    }


def print_table(runs: list[dict], comparison: dict | None) -> None:
    def f(v):
        return "-" if v is None else f"{v:.1f}"

    print(f"\n{'path':<8}{'req/s':>8}{'out tok/s':>11}{'TTFT p50':>10}{'TTFT p99':>10}"
          f"{'TPOT p50':>10}{'ITL p50':>9}{'ITL p99':>9}{'failed':>8}")  # fmt: skip
    for r in runs:
        print(f"{r['name']:<8}{r['request_per_s']:>8.2f}{r['output_tok_per_s']:>11.1f}"
              f"{f(r['ttft_ms']['p50']):>10}{f(r['ttft_ms']['p99']):>10}"
              f"{f(r['tpot_ms']['p50']):>10}{f(r['itl_ms']['p50']):>9}"
              f"{f(r['itl_ms']['p99']):>9}{r['failed']:>8}")  # fmt: skip
    if comparison:
        print(
            f"gateway / client throughput {comparison['throughput_ratio']:.3f}; "
            f"added TTFT p50 {comparison['added_ttft_p50_ms']:.2f} ms (times in ms)"
        )


# ---- main -----------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model name the server answers to")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson, req/s")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in +-ratio")
    p.add_argument("--vocab-size", type=int, default=32000, help="random ids below this")
    p.add_argument("--dataset", default=None, help="JSONL of input_len/prompt, output_len")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--compare-client", default=None, metavar="DEPLOYMENT",
                   help="also send the same requests through mii.client(DEPLOYMENT)")  # fmt: skip
    p.add_argument("--redis-url", default=None, help="for --compare-client / --launch")
    p.add_argument("--launch", default=None, metavar="MODEL",
                   help="start MODEL with mii.serve and its gateway, compare, stop")  # fmt: skip
    p.add_argument("--preset", default=None,
                   help="with --launch: serve this preset's shape (bench_common.PRESETS) with "
                        "random weights; --launch names the tokenizer folder")  # fmt: skip
    p.add_argument("--serve-option", action="append", default=[], metavar="KEY=JSON",
                   help="with --launch: a mii.serve option, e.g. max_num_seqs=256")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="alternate the paths this often")
    p.add_argument("--warmup", type=int, default=4, help="requests sent first, not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full numbers here")
    return p.parse_args(argv)


def launch(args):
    """mii.serve(MODEL) with its gateway on a free port; fills in base URL and names."""
    import socket

    import mii

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model, options = args.launch, dict(_serve_option(o) for o in args.serve_option)
    if args.preset:  # the preset's shape, random weights; the tokenizer of --launch
        from bench_common import preset_folder

        model = preset_folder(args.preset)
        options.update(load_format="dummy", tokenizer=args.launch)
    client = mii.serve(model, redis_url=args.redis_url, enable_restful_api=True,
                       restful_api_host="127.0.0.1", restful_api_port=port, **options)  # fmt: skip
    args.base_url, args.model = f"http://127.0.0.1:{port}", client.deployment_name
    args.compare_client, args.redis_url = client.deployment_name, client.redis_url
    return client


def _serve_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


async def bench(args) -> dict:
    rng = random.Random(args.seed)
    requests = from_jsonl(args, rng) if args.dataset else synthetic(args, rng)
    senders = [OpenAIHTTP(args.base_url, args.model, args.api_key, args.ignore_eos)]
    if args.compare_client:
        senders.append(MiiClient(args.compare_client, args.redis_url, args.ignore_eos))
    for sender in senders:  # warm both paths (connections, first batches)
        await run(sender, requests[: args.warmup], float("inf"), None, args.seed)
    runs: dict[str, list[dict]] = {s.name: [] for s in senders}
    for round_ in range(args.rounds):  # alternate which path goes first: load drifts
        for sender in senders[::-1] if round_ % 2 else senders:
            result = await run(sender, requests, args.request_rate, args.max_concurrency, args.seed)
            runs[sender.name].append(result)
    for sender in senders:
        await sender.close()
    median = {name: _median_run(rs) for name, rs in runs.items()}
    out = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "runs": runs,
           "median": median}  # fmt: skip
    if "client" in median:
        out["comparison"] = compare(median["http"], median["client"])
    return out


def _median_run(runs: list[dict]) -> dict:
    """The round of median throughput (its latencies come with it)."""
    return sorted(runs, key=lambda r: r["output_tok_per_s"])[(len(runs) - 1) // 2]


def main(argv=None) -> None:
    args = parse_args(argv)
    served = launch(args) if args.launch else None
    try:
        out = asyncio.run(bench(args))
    finally:
        if served is not None:
            served.terminate_server()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    print_table(list(out["median"].values()), out.get("comparison"))


if __name__ == "__main__":
    main()
