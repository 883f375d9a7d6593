"""The "fleet" workload: how much Redis work one generated token costs, and how far one
deployment's Redis scales with workers.

N worker processes run the fake engine (tests/worker/fake_engine.py) as stand-ins for GPU
workers: every step takes `1 / --steps-per-s` seconds and gives each running request one
token, so `--streams-per-worker` requests at 25 steps/s look like a GPU worker at batch 256.
Streaming clients (asyncio `astream`, closed loop: each stream submits its next request when
one ends) keep `streams-per-worker x N` requests running for `--seconds`. One private Redis.

Reported per worker count: generated tokens/s, Redis commands per token (`INFO
commandstats` deltas, every command of every process: workers, clients, Celery), Redis CPU
seconds per million tokens (`INFO cpu`), the clients' inter-token latency p50/p99, and the
commands that cost most. These are ratios that do not depend much on the host; the token
rate where adding workers stops adding tokens does (state the host). A table last; all
numbers as JSON with --json.

    python scripts/bench_fleet.py --workers 1,2,4 --streams-per-worker 64 --steps-per-s 25

`--cluster N`: the deployment on a local Redis Cluster of N primaries (no replicas) with N
request-stream partitions, Celery's broker on a separate plain Redis (its commands are not
counted then); the counters add up every primary's, and the CPU of the busiest primary is
reported too (`--redis-url` with `--partitions` uses a Redis or cluster that runs already).

    python scripts/bench_fleet.py --workers 2 --cluster 1 && ... --cluster 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time

import redis as redis_py

import mii
from mii.config import MIIConfig
from mii.launch.embedded_redis import EmbeddedRedis
from mii.launch.serve import serve_deployment

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_DIR = os.path.join(os.path.dirname(HERE), "tests", "worker")  # the fake engine
FAKE = "fake_engine:make_fake_engine"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1,2", help="worker counts to run, e.g. 1,2,4")
    p.add_argument("--streams-per-worker", type=int, default=64)
    p.add_argument("--steps-per-s", type=float, default=25.0, help="each fake worker's rate")
    p.add_argument("--tokens", type=int, default=64, help="generated tokens per request")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per count")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--broker", default="{}", help="JSON of broker settings for the deployment")
    p.add_argument("--cluster", type=int, default=0, help="primaries of a local Redis Cluster")
    p.add_argument("--redis-url", default=None, help="a Redis (or redis+cluster://) running")
    p.add_argument("--partitions", type=int, default=None, help="default: --cluster, else 1")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


# ---- Redis's own counters ------------------------------------------------------------------
def servers(client) -> list:
    """A plain client per Redis server: the one, or each primary of a cluster."""
    if hasattr(client, "get_primaries"):
        return [client.get_redis_connection(node) for node in client.get_primaries()]
    return [client]


def redis_counters(client) -> tuple[dict[str, int], list[float]]:
    """(calls by command, CPU seconds of each server) of the Redis servers so far."""
    calls: dict[str, int] = {}
    cpus = []
    for server in servers(client):
        for name, v in server.info("commandstats").items():
            key = name.removeprefix("cmdstat_")
            calls[key] = calls.get(key, 0) + v["calls"]
        cpu = server.info("cpu")
        cpus.append(float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]))
    return calls, cpus


def delta(before: tuple[dict, list], after: tuple[dict, list]) -> tuple[dict[str, int], list]:
    calls = {k: v - before[0].get(k, 0) for k, v in after[0].items()}
    cpus = [a - b for a, b in zip(after[1], before[1], strict=True)]
    return {k: v for k, v in calls.items() if v > 0}, cpus


# ---- clients ---------------------------------------------------------------------------------
class Streams:
    """Closed-loop streaming clients; counts tokens and inter-token gaps while `measuring`."""

    def __init__(self, client, n: int, tokens: int) -> None:
        self.client, self.n, self.tokens = client, n, tokens
        self.measuring = False
        self.received = 0
        self.gaps: list[float] = []
        self.stop = False

    async def run(self) -> None:
        await asyncio.gather(*(self._stream(i) for i in range(self.n)))

    async def _stream(self, i: int) -> None:
        rng = random.Random(i)
        while not self.stop:
            prompt = [rng.randrange(1, 255) for _ in range(16)]
            last = None
            options = dict(max_new_tokens=self.tokens, ignore_eos=True, do_sample=False)
            async for delta in self.client.astream(prompt, **options):
                now = time.perf_counter()
                if self.measuring and delta.token_ids:
                    self.received += len(delta.token_ids)
                    if last is not None:
                        self.gaps.append(now - last)
                last = now


async def measure(client, n: int, args) -> dict:
    streams = Streams(client, n, args.tokens)
    runner = asyncio.ensure_future(streams.run())
    await asyncio.sleep(args.warmup_s)
    admin = client.redis
    before, t0 = redis_counters(admin), time.perf_counter()
    streams.measuring = True
    await asyncio.sleep(args.seconds)
    streams.measuring = False
    wall, after = time.perf_counter() - t0, redis_counters(admin)
    streams.stop = True
    await runner
    return summarize(streams, delta(before, after), wall)


def summarize(streams: Streams, used: tuple[dict[str, int], list], wall: float) -> dict:
    calls, cpus = used
    cpu_s = sum(cpus)
    tokens = max(streams.received, 1)
    gaps = sorted(streams.gaps) or [0.0]
    top = sorted(calls.items(), key=lambda kv: -kv[1])[:8]
    return {
        "tokens": streams.received,
        "tokens_per_s": streams.received / wall,
        "commands": sum(calls.values()),
        "commands_per_token": sum(calls.values()) / tokens,
        "redis_cpu_s_per_mtoken": cpu_s / tokens * 1e6,
        "busiest_redis_cpu_share": max(cpus) / wall,  # of one core, the busiest server
        "itl_p50_ms": 1000 * statistics.median(gaps),
        "itl_p99_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))],
        "top_commands_per_token": {k: v / tokens for k, v in top},
    }


# ---- one worker count -------------------------------------------------------------------------
def run_count(workers: int, redis_url: str, args) -> dict:
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "replica_num": workers},
        deployment_name=f"fleet-{workers}", redis_url=redis_url,
        broker={"admit_batch": 64, "partitions": args.partitions, **json.loads(args.broker)},
    )  # fmt: skip
    served = serve_deployment(config, engine_factory=FAKE)
    try:
        client = mii.client(config.deployment_name, redis_url=redis_url)
        n = workers * args.streams_per_worker
        result = asyncio.run(measure(client, n, args))
    finally:
        served.terminate_server(timeout_s=30)
    return {"workers": workers, "streams": n, **result}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([FAKE_DIR, os.environ.get("PYTHONPATH", "")])
    os.environ["MII_FAKE_STEP_DELAY"] = str(1.0 / args.steps_per_s)
    args.partitions = args.partitions or max(1, args.cluster)
    started = []
    try:
        url = args.redis_url or _start_redis(args, started)
        rows = [run_count(int(w), url, args) for w in args.workers.split(",")]
        if not args.redis_url and not args.cluster:
            redis_py.Redis.from_url(url).flushall()
    finally:
        for server in started:
            server.stop()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "runs": rows}, f, indent=2)
    print_table(rows, args)


def _start_redis(args, started: list) -> str:
    """A private Redis, or a local cluster and a plain Redis for Celery's broker."""
    server = EmbeddedRedis().start()
    started.append(server)
    if not args.cluster:
        return server.url
    sys.path.insert(0, FAKE_DIR)
    from redis_cluster import RedisCluster

    os.environ["MII_CELERY_BROKER_URL"] = server.url
    cluster = RedisCluster(primaries=args.cluster, replicas=0)
    started.append(cluster)
    return cluster.start().url


def print_table(rows: list[dict], args) -> None:
    print(f"\nfake workers at {args.steps_per_s:g} steps/s, {args.streams_per_worker} streams "
          f"each, {args.tokens} tokens a request, {os.cpu_count()} cores here; "
          f"{args.cluster or 'no'} cluster primaries, {args.partitions} partitions")  # fmt: skip
    print(f"{'workers':>7} {'streams':>7} {'tok/s':>9} {'cmd/tok':>8} {'cpu s/Mtok':>10} "
          f"{'ITL p50':>8} {'ITL p99':>8} {'max cpu':>7}")  # fmt: skip
    for r in rows:
        print(f"{r['workers']:>7} {r['streams']:>7} {r['tokens_per_s']:>9.0f} "
              f"{r['commands_per_token']:>8.3f} {r['redis_cpu_s_per_mtoken']:>10.1f} "
              f"{r['itl_p50_ms']:>8.1f} {r['itl_p99_ms']:>8.1f} "
              f"{r['busiest_redis_cpu_share']:>7.2f}")  # fmt: skip
    for r in rows:
        top = ", ".join(f"{k} {v:.3f}" for k, v in r["top_commands_per_token"].items())
        print(f"  {r['workers']} workers, commands per token: {top}")


if __name__ == "__main__":
    main()
