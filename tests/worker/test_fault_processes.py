"""Faults with real worker processes (Celery workers running the fake engine) on a private
real Redis: a request that breaks the engine, an engine that breaks, a Redis that comes
back empty, a client killed with SIGKILL. What the user gets is asserted: errors, no hang,
workers that stay up (or exit non-zero and are restarted)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from fake_engine import expected_text
from harness import wait_for
from serving import FAKE

import mii
from mii.broker_config import wire
from mii.config import MIIConfig
from mii.constants import GenerationFinishReason as Reason
from mii.errors import GenerationError
from mii.launch.serve import serve_deployment

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]
# Heartbeats of 1 s: a worker is dead after 3 s of silence. At 0.5 s (dead after 1.5 s) a
# worker starved by a loaded 2-core CI host looked dead, and two live workers took a request
# from each other until it was dead-lettered.
FAST = {"heartbeat_interval_s": 1.0, "reclaim_idle_s": 5.0, "client_timeout_s": 1.0}


def _serve(name: str, redis_url: str, replicas: int = 1, **broker):
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "replica_num": replicas},
        deployment_name=name, redis_url=redis_url, broker={**FAST, **broker},
    )  # fmt: skip
    return serve_deployment(config, engine_factory=FAKE)


def test_a_request_that_breaks_the_engine_fails_alone(worker_env, private_redis):
    client = _serve("poison-dep", private_redis.url, replicas=2)
    try:
        pids = [w.pid for w in client.local.workers]
        with pytest.raises(GenerationError, match="failed 3 times"):
            client.generate(["POISON pill", "fine"], max_new_tokens=4)
        assert client.generate("fine", max_new_tokens=4)[0].generated_text == expected_text(
            "fine", 4
        )
        assert [w.pid for w in client.local.workers] == pids  # nobody died
        assert all(w.exit_code() is None for w in client.local.workers)
        assert client.redis.xlen(client.keys.deadletter) == 1
    finally:
        client.terminate_server(timeout_s=20)


def test_a_broken_engine_exits_non_zero_and_its_request_is_dead_lettered(
    worker_env, private_redis, caplog
):
    client = _serve("fatal-dep", private_redis.url)
    try:
        first = client.local.workers[0].pid
        with pytest.raises(GenerationError, match="dead-lettered"):
            client.generate("FATAL pill", max_new_tokens=2, timeout=80)
        assert "exited with code 1" in caplog.text  # Celery's exit code says it failed
        wait_for(lambda: client.local.workers[0].exit_code() is None, 20, "a live worker")
        assert client.local.workers[0].pid != first
        assert client.generate("after", max_new_tokens=3)[0].generated_text == expected_text(
            "after", 3
        )
    finally:
        client.terminate_server(timeout_s=20)


def test_a_request_that_hangs_the_engine_is_dead_lettered_and_the_workers_come_back(
    worker_env, private_redis, caplog
):
    """A step that never returns ends its worker through the step watchdog; the supervisor
    restarts it, another worker takes the request over and hangs in turn, until the request
    has used up its deliveries: its client gets an error, not a hang."""
    client = _serve("hang-dep", private_redis.url, replicas=2, step_timeout_s=3.0)
    try:
        first = {w.pid for w in client.local.workers}
        with pytest.raises(GenerationError, match="dead-lettered"):
            client.generate("HANG pill", max_new_tokens=2, timeout=100)
        assert "exited with code 1" in caplog.text
        assert client.redis.xlen(client.keys.deadletter) == 1
        wait_for(lambda: all(w.exit_code() is None for w in client.local.workers), 20,
                 "live workers")  # fmt: skip
        assert {w.pid for w in client.local.workers} != first
        assert client.generate("after", max_new_tokens=3)[0].generated_text == expected_text(
            "after", 3
        )
    finally:
        client.terminate_server(timeout_s=20)


def test_workers_set_up_a_redis_that_came_back_empty(worker_env, private_redis):
    client = _serve("flushed-dep", private_redis.url, replicas=2)
    try:
        assert client.generate("before", max_new_tokens=2)[0].generated_length == 2
        client.redis.flushall()
        wait_for(lambda: client.redis.exists(client.keys.config), 10, "the record restored")
        other = mii.client("flushed-dep", redis_url=private_redis.url)
        responses = other.generate([f"after {i}" for i in range(8)], max_new_tokens=3)
        assert [r.generated_text for r in responses] == [
            expected_text(f"after {i}", 3) for i in range(8)
        ]
        assert all(w.exit_code() is None for w in client.local.workers)
    finally:
        client.terminate_server(timeout_s=20)


CLIENT = """
import sys, mii
client = mii.client(sys.argv[1], redis_url=sys.argv[2])
for delta in client.stream("endless", max_new_tokens=1_000_000, timeout=None):
    print(delta.generated_text, flush=True)
"""


def test_the_request_of_a_killed_client_is_cancelled(worker_env, private_redis, monkeypatch):
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.01")
    client = _serve("orphan-dep", private_redis.url)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLIENT, "orphan-dep", private_redis.url],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        assert proc.stdout.readline()  # it is streaming
        (key,) = client.redis.keys(client.keys.replies("*"))  # the killed client's
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = time.monotonic()

        def final():
            last = client.redis.xrevrange(key, count=1)
            chunks = wire.decode_reply(last[0][1]) if last else []
            return chunks and chunks[0][1].final and chunks[0][1]

        last = wait_for(final, 20, "the worker to cancel the request")
        assert last.reason == Reason.CANCELLED
        assert time.monotonic() - killed < 10  # client_timeout_s is 1 s; not 1e6 tokens
    finally:
        client.terminate_server(timeout_s=20)
