"""`mii.serve` supervises the worker processes it started (real processes, fake engine, a
private Redis): a worker that dies is marked EXITED at once and restarted; workers that
keep dying fail the deployment, and clients are told; a SIGKILLed worker that nobody
supervises stops counting as live once its heartbeat is old."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest
from fake_engine import expected_text
from harness import wait_for
from serving import FAKE, fake_config

from mii.broker_config.deployment import (
    DeploymentRecord,
    live_workers,
    read_state,
    read_workers,
    save_record,
)
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.errors import DeploymentFailedError
from mii.launch.processes import WorkerSpec
from mii.launch.serve import serve_deployment
from mii.producer.client import Client

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


def _status_of(client, pid: int) -> dict | None:
    return next((s for s in read_workers(client.redis, client.keys).values() if s["pid"] == pid),
                None)  # fmt: skip


def _live_states(client, keys: DeploymentKeys, dead_after_s: float) -> list[str]:
    return [s["state"] for s in live_workers(client.redis, keys, dead_after_s).values()]


def test_a_killed_worker_is_marked_exited_at_once_and_restarted(worker_env, private_redis,
                                                                 monkeypatch, caplog):  # fmt: skip
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.02")
    config = fake_config("restart-dep", redis_url=private_redis.url)
    client = serve_deployment(config, engine_factory=FAKE)
    try:
        in_flight = client.submit(["survive this"], max_new_tokens=100)
        wait_for(lambda: client.redis.xpending(client.keys.requests, WORKER_GROUP)["pending"],
                 10, "the request to be taken")  # fmt: skip
        (victim,) = client.local.workers
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: _status_of(client, victim.pid)["state"] == "exited", 5, "EXITED")
        assert time.monotonic() - killed < 2.0  # not after its heartbeat aged (15 s)
        wait_for(lambda: client.local.workers[0].pid != victim.pid, 10, "a restart")
        for _ in in_flight:  # the new worker takes over the request
            pass
        (response,) = in_flight.responses()
        assert response.generated_text == expected_text("survive this", 100)
        assert time.monotonic() - killed < config.broker.reclaim_idle_s
        assert "exited with code -9" in caplog.text and "restarting worker" in caplog.text
    finally:
        client.terminate_server(timeout_s=20)


def test_workers_that_keep_dying_fail_the_deployment(worker_env, private_redis, monkeypatch):
    broker = {"worker_restarts_per_minute": 1, "lost_request_grace_s": 1.0}
    config = fake_config("failing-dep", redis_url=private_redis.url, broker=broker)
    client = serve_deployment(config, engine_factory=FAKE)
    try:
        waiting: dict[str, BaseException] = {}
        thread = threading.Thread(target=_generate, args=(client, waiting), daemon=True)
        monkeypatch.setenv("MII_FAKE_STEP_DELAY", "broken")  # every restart's engine fails
        os.kill(client.local.workers[0].pid, signal.SIGKILL)
        thread.start()
        wait_for(lambda: read_state(client.redis, client.keys).get("state") == "failed", 30,
                 "the deployment to fail")  # fmt: skip
        error = read_state(client.redis, client.keys)["error"]
        assert "restart" in error and "could not convert string to float" in error  # log tail
        with pytest.raises(DeploymentFailedError):
            client.wait_for_workers(threading.Event())  # mii serve exits with this
        with pytest.raises(DeploymentFailedError):
            client.generate("after", max_new_tokens=2)
        thread.join(15)
        assert isinstance(waiting.get("error"), DeploymentFailedError)  # not a hang
    finally:
        client.terminate_server(timeout_s=20)


def test_a_worker_of_a_deployment_served_again_elsewhere_is_not_restarted(
    worker_env, private_redis
):
    """`mii terminate` then `mii serve` of the same name from another launcher, while this
    one's worker is still on its way out: the name is no longer this launcher's."""
    config = fake_config("replaced-dep", redis_url=private_redis.url)
    client = serve_deployment(config, engine_factory=FAKE)
    try:
        mii_config = config.model_dump(mode="json", by_alias=True, exclude={"redis_url"})
        save_record(client.redis, client.keys, DeploymentRecord(mii_config=mii_config))
        (worker,) = client.local.workers
        os.kill(worker.pid, signal.SIGKILL)
        assert client.local.supervisor.wait(5)  # nothing left to supervise
        assert client.local.workers == [worker]
    finally:  # not waiting for the killed worker's status to age: it belongs to no one
        client.terminate_server(timeout_s=1)


def _generate(client, into: dict) -> None:
    try:
        client.generate("waiting", max_new_tokens=4)
    except BaseException as exc:  # the test looks at it
        into["error"] = exc


def test_a_sigkilled_worker_stops_being_live_after_its_heartbeat(worker_env, private_redis):
    """No supervisor here (a worker on another host, or a launcher that died with it)."""
    fast = {"heartbeat_interval_s": 0.2, "reclaim_idle_s": 5.0}
    config = fake_config("sigkill-dep", broker=fast)
    keys = DeploymentKeys("sigkill-dep")
    client = Client(config, private_redis.url)
    mii_config = config.model_dump(mode="json", by_alias=True, exclude={"redis_url"})
    save_record(client.redis, keys, DeploymentRecord(mii_config=mii_config))
    worker = WorkerSpec(keys.deployment, private_redis.url, FAKE).spawn(0)
    try:
        dead_after = config.broker.dead_after_s
        wait_for(lambda: _live_states(client, keys, dead_after) == ["ready"], 30, "readiness")
        os.kill(worker.pid, signal.SIGKILL)
        wait_for(lambda: not live_workers(client.redis, keys, dead_after), 5, "not live")
        (name, stale), *_ = read_workers(client.redis, keys).items()
        assert stale["state"] == "ready"  # what it said last, and says for ever
        again = fake_config("sigkill-dep", redis_url=private_redis.url, broker=fast)
        served = serve_deployment(again, engine_factory=FAKE)  # not "already served"
        client.redis.hset(keys.workers, name, json.dumps(stale))
        started = time.monotonic()
        served.terminate_server(timeout_s=30)
        assert time.monotonic() - started < 5  # did not wait for the dead worker
    finally:
        worker.process.kill()
        worker.process.wait()
