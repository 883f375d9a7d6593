"""Serving benchmark over the OpenAI protocol, in the style of vLLM's `benchmark_serving`.

Requests arrive at a Poisson rate (`--request-rate`, inf: all at once) under an optional
concurrency cap (`--max-concurrency`); prompts are random token ids of synthetic lengths
(`--input-len`, `--output-len`, `--range-ratio`) or lengths read from a JSONL
(`--dataset`, lines `{"input_len": .., "output_len": ..}` or `{"prompt": "..",
"output_len": ..}`). Output lengths are fixed with `ignore_eos` (vLLM's extension; drop it
with `--no-ignore-eos`). Reported: request/s, output tok/s, TTFT, TPOT and inter-token
latency p50/p99; the CPU the benchmark's own sender processes used, in cores (near 1.0
per sender process: the benchmark, not the server, set the pace; `--procs N` spreads the
load over N sender processes), and with `--launch` the CPU of the gateway, the workers and
Redis; with a Redis URL (`--redis-url`, or `--launch`), Redis commands per output token
from `INFO commandstats`. Full numbers as JSON (`--json`), a short table printed last.

HTTP goes through aiohttp when it is installed (as vLLM's benchmark does), else httpx;
either way the raw bytes are split into server-sent events here.

Any OpenAI-compatible server:
    python scripts/bench_serving.py --base-url http://host:8000 --model NAME
The gateway against `mii.client` on the same deployment, same requests, one run:
    python scripts/bench_serving.py --base-url http://host:8000 --model DEP --compare-client DEP
Self-contained (starts a deployment and its gateway, runs both, stops them):
    python scripts/bench_serving.py --launch smollm2 --num-requests 64 --max-concurrency 16
    python scripts/bench_serving.py --fake-engine --fake-step-delay 0.01 --gateway-workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import math
import multiprocessing
import os
import random
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

try:
    import aiohttp
except ImportError:  # httpx, which the gateway's tests need anyway
    aiohttp = None

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_DIR = os.path.join(os.path.dirname(HERE), "tests", "worker")  # the fake engine


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
@dataclass(frozen=True)
class SenderSpec:
    """What a sender process needs to build a sender (picklable)."""

    name: str  # "http" or "client"
    target: str  # base URL, or deployment name
    model: str | None = None
    api_key: str | None = None
    redis_url: str | None = None
    ignore_eos: bool = True
    http_client: str = "aiohttp"

    def make(self):
        if self.name == "http":
            return OpenAIHTTP(self.target, self.model, self.api_key, self.ignore_eos,
                              aiohttp_session=self.http_client == "aiohttp")  # fmt: skip
        return MiiClient(self.target, self.redis_url, self.ignore_eos)


def sse_payloads(buffer: bytearray, data: bytes) -> list[bytes]:
    """Append `data`; take the payloads of the complete `data: ...` events out of `buffer`."""
    buffer += data
    *events, rest = bytes(buffer).split(b"\n\n")
    del buffer[: len(buffer) - len(rest)]
    return [e[6:] for e in events if e.startswith(b"data: ")]


class HTTPStatusError(Exception):
    pass


class OpenAIHTTP:
    """Streams `/v1/completions` and times the server-sent events."""

    name = "http"

    def __init__(self, base_url: str, model: str, api_key: str | None, ignore_eos: bool,
                 aiohttp_session: bool = aiohttp is not None):  # fmt: skip
        self.base_url, self.model, self.ignore_eos = base_url.rstrip("/"), model, ignore_eos
        self.aiohttp = aiohttp_session
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.session = None

    async def send(self, request: Request) -> Result:
        body = {"model": self.model, "prompt": request.prompt, "max_tokens": request.output_len,
                "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}}  # fmt: skip
        if self.ignore_eos:
            body["ignore_eos"] = True
        result, start, last, buffer = Result(), time.perf_counter(), None, bytearray()
        try:
            async for data in self._stream(body):
                for payload in sse_payloads(buffer, data):
                    if payload == b"[DONE]":
                        continue
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        result.output_tokens = chunk["usage"]["completion_tokens"]
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        last = _tick(result, start, last)
        except HTTPStatusError as exc:
            result.error = str(exc)
        result.e2e = time.perf_counter() - start
        return result

    async def _stream(self, body: dict):
        """The response body's bytes as they arrive."""
        url = f"{self.base_url}/v1/completions"
        if self.aiohttp:
            if self.session is None:
                connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
                self.session = aiohttp.ClientSession(
                    connector=connector, headers=self.headers,
                    timeout=aiohttp.ClientTimeout(total=600))  # fmt: skip
            async with self.session.post(url, json=body) as reply:
                if reply.status != 200:
                    raise HTTPStatusError(f"HTTP {reply.status}: {(await reply.read())[:200]!r}")
                async for data in reply.content.iter_any():
                    yield data
            return
        import httpx

        if self.session is None:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
            self.session = httpx.AsyncClient(headers=self.headers, limits=limits,
                                             timeout=httpx.Timeout(600.0))  # fmt: skip
        async with self.session.stream("POST", url, json=body) as reply:
            if reply.status_code != 200:
                raise HTTPStatusError(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
            async for data in reply.aiter_raw():
                yield data

    async def close(self) -> None:
        if self.session is not None:
            await (self.session.close() if self.aiohttp else self.session.aclose())


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
    """Send `requests`; their results in order."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency or len(requests) or 1)

    async def one(request: Request) -> Result:
        async with gate:
            try:
                return await sender.send(request)
            except Exception as exc:  # noqa: BLE001 (reported per request)
                return Result(error=f"{type(exc).__name__}: {exc}")

    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(one(request)))
        if math.isfinite(rate):
            await asyncio.sleep(rng.expovariate(rate))
    return await asyncio.gather(*tasks)


@dataclass
class SliceResult:
    results: list[Result]
    started: float  # time.monotonic(): one clock for every process of the host
    ended: float
    cpu_s: float  # this sender process's CPU time over the slice


class SliceRunner:
    """One sender process's event loop and senders, kept between runs (warm connections)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.senders: dict[SenderSpec, object] = {}
        atexit.register(self.close)

    def close(self) -> None:
        for sender in self.senders.values():
            self.loop.run_until_complete(sender.close())
        self.senders.clear()

    def run(self, spec: SenderSpec, requests, rate, concurrency, seed, start_at) -> SliceResult:
        if spec not in self.senders:
            self.senders[spec] = spec.make()
        return self.loop.run_until_complete(
            self._timed(self.senders[spec], requests, rate, concurrency, seed, start_at)
        )

    @staticmethod
    async def _timed(sender, requests, rate, concurrency, seed, start_at) -> SliceResult:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu, started = time.process_time(), time.monotonic()
        results = await run(sender, requests, rate, concurrency, seed)
        return SliceResult(results, started, time.monotonic(), time.process_time() - cpu)


_RUNNER: SliceRunner | None = None  # of this process (the main one, or a sender process)


def run_slice(spec: SenderSpec, requests, rate, concurrency, seed, start_at) -> SliceResult:
    global _RUNNER
    if _RUNNER is None:
        _RUNNER = SliceRunner()
    return _RUNNER.run(spec, requests, rate, concurrency, seed, start_at)


class Senders:
    """Runs a workload from this process, or split over `procs` sender processes: every
    process takes every procs-th request, its share of the rate and of the concurrency,
    and all start at the same moment."""

    def __init__(self, procs: int) -> None:
        self.procs = procs
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(procs, mp_context=context) if procs > 1 else None

    def run(self, spec, requests, rate, concurrency, seed) -> tuple[list[Result], float, float]:
        """(results, wall seconds, CPU seconds of the senders)."""
        if self.pool is None:
            part = run_slice(spec, requests, rate, concurrency, seed, time.monotonic())
            return part.results, part.ended - part.started, part.cpu_s
        n, start_at = self.procs, time.monotonic() + 0.5
        caps = [None if concurrency is None else max(1, concurrency // n + (i < concurrency % n))
                for i in range(n)]  # fmt: skip
        parts = list(self.pool.map(run_slice, [spec] * n, [requests[i::n] for i in range(n)],
                                   [rate / n] * n, caps, [seed + i for i in range(n)],
                                   [start_at] * n))  # fmt: skip
        results = [None] * len(requests)
        for i, part in enumerate(parts):
            results[i::n] = part.results
        wall = max(p.ended for p in parts) - min(p.started for p in parts)
        return results, wall, sum(p.cpu_s for p in parts)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


# ---- what else the run cost: CPU of each process, Redis commands ----------------------------
class Probe:
    """CPU seconds of the processes this benchmark started (by role) and Redis commands,
    counted between `Probe(...)` and `done()`."""

    ROLES = (("mii.gateway", "gateway"), ("mii worker", "worker"), ("redis-server", "redis"))

    def __init__(self, redis_url: str | None) -> None:
        self.redis = None
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url)
        self.cpu, self.commands, self.start = self._cpu(), self._commands(), time.monotonic()

    def done(self, output_tokens: int) -> dict:
        wall = time.monotonic() - self.start
        cpu = {role: s - self.cpu.get(role, 0.0) for role, s in self._cpu().items()}
        out = {"cpu_cores": {role: s / wall for role, s in cpu.items()}}
        if self.redis is not None:
            after = self._commands()
            out["cpu_cores"]["redis"] = (after.pop("(cpu_s)") - self.commands["(cpu_s)"]) / wall
            delta = {c: n - self.commands.get(c, 0) for c, n in after.items()}
            delta = {c: n for c, n in sorted(delta.items(), key=lambda kv: -kv[1]) if n > 0}
            per_token = {c: n / max(1, output_tokens) for c, n in delta.items()}
            out["redis_commands"] = delta
            out["redis_commands_per_token"] = sum(delta.values()) / max(1, output_tokens)
            out["redis_commands_per_token_by_command"] = per_token
        return out

    def _cpu(self) -> dict[str, float]:
        try:
            import psutil
        except ImportError:
            return {}
        totals: dict[str, float] = {}
        for proc in psutil.Process().children(recursive=True):
            try:
                role = self._role(proc)
                times = proc.cpu_times()
            except psutil.Error:
                continue
            totals[role] = totals.get(role, 0.0) + times.user + times.system
        return totals

    def _role(self, proc) -> str:
        """By the command line of the process or of its nearest ancestor below this one
        that has a role (a multi-process gateway's processes are children of `mii.gateway`)."""
        for each in [proc, *proc.parents()]:
            if each.pid == os.getpid():
                break
            cmdline = " ".join(each.cmdline())
            role = next((r for marker, r in self.ROLES if marker in cmdline), None)
            if role is not None:
                return role
        return "senders" if "multiprocessing" in " ".join(proc.cmdline()) else "other"

    def _commands(self) -> dict[str, int]:
        if self.redis is None:
            return {}
        stats = self.redis.info("commandstats")
        calls = {k.removeprefix("cmdstat_"): v["calls"] for k, v in stats.items()}
        cpu = self.redis.info("cpu")  # wherever Redis runs, not only a child of this process
        return {**calls, "(cpu_s)": cpu["used_cpu_user"] + cpu["used_cpu_sys"]}


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
          f"{'TPOT p50':>10}{'ITL p50':>9}{'ITL p99':>9}{'failed':>8}{'bench CPU':>11}"
          f"{'cmd/tok':>9}")  # fmt: skip
    for r in runs:
        cmds = r.get("redis_commands_per_token")
        print(f"{r['name']:<8}{r['request_per_s']:>8.2f}{r['output_tok_per_s']:>11.1f}"
              f"{f(r['ttft_ms']['p50']):>10}{f(r['ttft_ms']['p99']):>10}"
              f"{f(r['tpot_ms']['p50']):>10}{f(r['itl_ms']['p50']):>9}"
              f"{f(r['itl_ms']['p99']):>9}{r['failed']:>8}{r['bench_cpu_cores']:>11.2f}"
              f"{'-' if cmds is None else f'{cmds:.3f}':>9}")  # fmt: skip
    for r in runs:
        cores = ", ".join(f"{role} {c:.2f}" for role, c in r.get("cpu_cores", {}).items())
        if cores:
            print(f"{r['name']}: CPU cores busy: {cores}")
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
    p.add_argument("--vocab-size", type=int, default=None,
                   help="random ids below this (32000; 256 with --fake-engine)")  # fmt: skip
    p.add_argument("--dataset", default=None, help="JSONL of input_len/prompt, output_len")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--compare-client", default=None, metavar="DEPLOYMENT",
                   help="also send the same requests through mii.client(DEPLOYMENT)")  # fmt: skip
    p.add_argument("--redis-url", default=None,
                   help="the deployment's Redis (--compare-client, --launch, cmd/tok)")  # fmt: skip
    p.add_argument("--http-client", choices=["aiohttp", "httpx"], default=None,
                   help="default: aiohttp when installed")  # fmt: skip
    p.add_argument("--procs", type=int, default=1,
                   help="sender processes sharing the load (each path alike)")  # fmt: skip
    p.add_argument("--launch", default=None, metavar="MODEL",
                   help="start MODEL with mii.serve and its gateway, compare, stop")  # fmt: skip
    p.add_argument("--fake-engine", action="store_true",
                   help="launch tests/worker/fake_engine.py, not a model")  # fmt: skip
    p.add_argument("--fake-step-delay", type=float, default=0.01,
                   help="with --fake-engine: seconds per engine step")  # fmt: skip
    p.add_argument("--gateway-workers", type=int, default=1,
                   help="with --launch, --fake-engine: gateway processes")  # fmt: skip
    p.add_argument("--preset", default=None,
                   help="with --launch: serve this preset's shape (bench_common.PRESETS) with "
                        "random weights; --launch names the tokenizer folder")  # fmt: skip
    p.add_argument("--serve-option", action="append", default=[], metavar="KEY=JSON",
                   help="with --launch: a mii.serve option, e.g. max_num_seqs=256")  # fmt: skip
    p.add_argument("--rounds", type=int, default=1, help="alternate the paths this often")
    p.add_argument("--warmup", type=int, default=4, help="requests sent first, not counted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the full numbers here")
    args = p.parse_args(argv)
    if args.http_client is None:
        args.http_client = "httpx" if aiohttp is None else "aiohttp"
    if args.vocab_size is None:
        args.vocab_size = 256 if args.fake_engine else 32000  # the fake engine's byte ids
    return args


class Launched:
    """A deployment and its gateway that this benchmark started."""

    def __init__(self, client, gateway) -> None:
        self.client, self.gateway = client, gateway

    def stop(self) -> None:
        try:
            self.gateway.stop()
        finally:
            self.client.terminate_server()


def launch(args) -> Launched:
    """A deployment (mii.serve(MODEL), or the fake engine) and a gateway of
    `--gateway-workers` processes on a free port; fills in base URL and names."""
    from mii.launch.embedded_redis import free_port
    from mii.launch.gateway import spawn_gateway

    client = _serve_fake(args) if args.fake_engine else _serve_model(args)
    try:
        extra = ("--workers", str(args.gateway_workers), "--log-level", "warning")
        port = free_port()
        gateway = spawn_gateway(client.deployment_name, client.redis_url, "127.0.0.1", port,
                                extra_args=extra)  # fmt: skip
    except BaseException:
        client.terminate_server()
        raise
    args.base_url, args.model = f"http://127.0.0.1:{port}", client.deployment_name
    args.compare_client, args.redis_url = client.deployment_name, client.redis_url
    return Launched(client, gateway)


def _serve_model(args):
    import mii

    model, options = args.launch, dict(_serve_option(o) for o in args.serve_option)
    if args.preset:  # the preset's shape, random weights; the tokenizer of --launch
        from bench_common import preset_folder

        model = preset_folder(args.preset)
        options.update(load_format="dummy", tokenizer=args.launch)
    return mii.serve(model, redis_url=args.redis_url, **options)


def _serve_fake(args):
    from mii.config import MIIConfig
    from mii.launch.serve import serve_deployment

    os.environ["PYTHONPATH"] = os.pathsep.join([FAKE_DIR, os.environ.get("PYTHONPATH", "")])
    os.environ["MII_FAKE_STEP_DELAY"] = str(args.fake_step_delay)
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "max_length": 4096},
        deployment_name="bench-serving-fake",
        redis_url=args.redis_url,
        broker={"admit_batch": 256, "max_queue_depth": 100_000},
    )
    return serve_deployment(config, engine_factory="fake_engine:make_fake_engine")


def _serve_option(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def bench(args) -> dict:
    rng = random.Random(args.seed)
    requests = from_jsonl(args, rng) if args.dataset else synthetic(args, rng)
    specs = [SenderSpec("http", args.base_url, args.model, args.api_key,
                        ignore_eos=args.ignore_eos, http_client=args.http_client)]  # fmt: skip
    if args.compare_client:
        specs.append(SenderSpec("client", args.compare_client, redis_url=args.redis_url,
                                ignore_eos=args.ignore_eos))  # fmt: skip
    senders = Senders(args.procs)
    try:
        for spec in specs:  # warm both paths (connections, first batches)
            senders.run(spec, requests[: args.warmup * args.procs], float("inf"), None, args.seed)
        runs = _rounds(args, senders, specs, requests)
    finally:
        senders.close()
    median = {name: _median_run(rs) for name, rs in runs.items()}
    out = {"config": {k: v for k, v in vars(args).items() if k != "api_key"}, "runs": runs,
           "median": median}  # fmt: skip
    if "client" in median:
        out["comparison"] = compare(median["http"], median["client"])
    return out


def _rounds(args, senders: Senders, specs: list[SenderSpec], requests) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {s.name: [] for s in specs}
    for round_ in range(args.rounds):  # alternate which path goes first: load drifts
        for spec in specs[::-1] if round_ % 2 else specs:
            probe = Probe(args.redis_url)
            results, wall, cpu = senders.run(spec, requests, args.request_rate,
                                             args.max_concurrency, args.seed)  # fmt: skip
            summary = summarize(spec.name, results, wall)
            summary["bench_cpu_cores"] = cpu / wall
            summary.update(probe.done(summary["output_tokens"]))
            runs[spec.name].append(summary)
    return runs


def _median_run(runs: list[dict]) -> dict:
    """The round of median throughput (its latencies come with it)."""
    return sorted(runs, key=lambda r: r["output_tok_per_s"])[(len(runs) - 1) // 2]


def main(argv=None) -> None:
    args = parse_args(argv)
    launched = launch(args) if args.launch or args.fake_engine else None
    try:
        out = bench(args)
    finally:
        if launched is not None:
            launched.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2, default=str)
    print(f"HTTP client: {args.http_client}; sender processes: {args.procs}")
    print_table(list(out["median"].values()), out.get("comparison"))


if __name__ == "__main__":
    main()
