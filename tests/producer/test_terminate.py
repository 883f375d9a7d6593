"""`terminate_server` with work still queued (real worker processes, fake engine, a private
Redis): every waiting client gets an error, bulk lines record it, the deployment's keys are
gone, and a new deployment of the same name serves none of the old requests."""

from __future__ import annotations

import threading
import time

import pytest
import redis as redis_py
from fake_engine import expected_text
from harness import wait_for
from serving import FAKE, fake_config

import mii
from mii.broker_config import wire
from mii.broker_config.keys import DeploymentKeys
from mii.constants import GenerationFinishReason as Reason
from mii.errors import MIIError
from mii.launch.serve import serve_deployment
from mii.producer.bulk.jobs import BulkJobs, read_input

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]
NAME = "term-dep"
CLIENTS, PER_CLIENT, BULK_LINES = 4, 125, 20


def _wait_on(url: str, prompts: list[str], outcome: dict) -> None:
    client = mii.client(NAME, redis_url=url, delete_responses=False)
    try:
        client.generate(prompts, max_new_tokens=1000)
        outcome[prompts[0]] = None
    except MIIError as exc:
        outcome[prompts[0]] = (exc, time.monotonic())


def test_terminate_ends_queued_work_and_a_redeploy_starts_clean(
    worker_env, private_redis, monkeypatch
):
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.2")  # a slow worker: most requests wait
    keys = DeploymentKeys(NAME)
    redis = redis_py.Redis.from_url(private_redis.url)
    served = serve_deployment(fake_config(NAME, redis_url=private_redis.url), engine_factory=FAKE)
    try:
        outcome: dict[str, tuple | None] = {}
        threads = [
            threading.Thread(target=_wait_on, args=(private_redis.url, _prompts(c), outcome))
            for c in range(CLIENTS)
        ]
        for thread in threads:
            thread.start()
        jobs = BulkJobs(served)
        lines = [f'{{"prompt": "bulk line {i}"}}' for i in range(BULK_LINES)]
        job = jobs.submit(read_input(lines), params={"max_new_tokens": 8})
        wait_for(lambda: redis.xlen(keys.requests) >= CLIENTS * PER_CLIENT, 30, "500 requests")

        terminated = time.monotonic()
        mii.client(NAME, redis_url=private_redis.url).terminate_server(timeout_s=30)
        for thread in threads:
            thread.join(20)
        assert all(not t.is_alive() for t in threads), "a client still waits"
        for error, when in outcome.values():  # every waiting client was told, promptly
            assert "terminated" in str(error) and when - terminated < 15
        _assert_every_request_ended_with_an_error(redis, keys)
        status = jobs.status(job.job_id)  # the job's keys keep their TTL
        assert status.done == status.errors == BULK_LINES
        assert all("terminated" in r["error"] for r in jobs.results(job.job_id))
        left = {k.decode().split(":")[2] for k in redis.scan_iter(f"{keys.prefix}:*")}
        # responses expire; old clients may still refresh their liveness key and cancel
        # what they abandoned (markers that expire, entries for workers of no deployment)
        assert left <= {"resp", "replies", "job", "cancelled", "control", "client"}, left

        _assert_a_redeploy_starts_clean(private_redis.url, redis, keys)
        (old,) = served.local.workers  # its launcher restarted nothing into the new one
        assert served.local.supervisor.wait(10) and old.exit_code() is not None
    finally:
        served.local.stop_workers(timeout_s=5)


def _assert_a_redeploy_starts_clean(url: str, redis, keys: DeploymentKeys) -> None:
    again = serve_deployment(fake_config(NAME, redis_url=url), engine_factory=FAKE)
    try:
        assert redis.xlen(keys.requests) == redis.xlen(keys.bulk) == 0
        (fresh,) = again.generate("fresh", max_new_tokens=3)
        assert fresh.generated_text == expected_text("fresh", 3)
        _assert_every_request_ended_with_an_error(redis, keys)  # nothing added to them
    finally:
        again.terminate_server(timeout_s=20)


def _prompts(client: int) -> list[str]:
    return [f"client {client} prompt {i}" for i in range(PER_CLIENT)]


def _assert_every_request_ended_with_an_error(redis, keys: DeploymentKeys) -> None:
    """Each old request's chunks (in its call's reply stream) end with one final chunk,
    nothing after it, and expire: the termination's error, or a cancel from its client
    (whose call failed on the first error and cancelled the rest)."""
    per_request: dict[str, list] = {}
    streams = list(redis.scan_iter(keys.replies("*")))
    for key in streams:
        assert redis.ttl(key) > 0
        for _, fields in redis.xrange(key):
            for rid, chunk in wire.decode_reply(fields):
                per_request.setdefault(rid, []).append(chunk)
    assert len(per_request) == CLIENTS * PER_CLIENT
    for rid, chunks in per_request.items():
        (final,) = [c for c in chunks if c.final]
        assert final is chunks[-1]
        assert final.reason == Reason.CANCELLED or "terminated" in final.error, (rid, final)
