"""Workers as Celery workers seen through Flower: a real `mii worker` process (a tiny model on
the CPU), a real Flower with basic auth, a private Redis."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from harness import wait_for
from redis_server import RedisServer
from tiny_models import build_tiny_model

import mii
from mii.broker_config.connection import connect
from mii.broker_config.deployment import read_workers
from mii.broker_config.keys import DeploymentKeys
from mii.launch.embedded_redis import free_port
from mii.worker.celery.app import make_app

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]
DEPLOYMENT = "celery-dep"
AUTH = "ops:secret"


def http_get(url: str, auth: str | None = AUTH, timeout: float = 10.0) -> bytes:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    with urllib.request.urlopen(request, timeout=timeout) as reply:
        return reply.read()


class Fleet:
    def __init__(self, tmp) -> None:
        self.redis = RedisServer().start()
        self.env = {**os.environ, "MII_REDIS_URL": self.redis.url, "PYTHONUNBUFFERED": "1"}
        self.model = build_tiny_model("llama", str(tmp / "tiny"))
        self.flower_port, self.metrics_port = free_port(), free_port()
        self.logs = tmp
        self.processes: list[subprocess.Popen] = []

    def start(self) -> Fleet:
        self._spawn("worker", "--deployment", DEPLOYMENT, "--model", self.model,
                    "--metrics-port", str(self.metrics_port))  # fmt: skip
        self._spawn("flower", "--basic-auth", AUTH, "--port", str(self.flower_port))
        keys = DeploymentKeys(DEPLOYMENT)
        client = connect(self.redis.url)
        wait_for(lambda: any(w["state"] == "ready" for w in read_workers(client, keys).values()),
                 90, "the worker to report ready")  # fmt: skip
        wait_for(self._flower_up, 60, "Flower to answer")
        return self

    def _spawn(self, *args: str) -> None:
        log = open(self.logs / f"{args[0]}.log", "wb")  # noqa: SIM115 (lives with the process)
        self.processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "mii", *args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )

    def _flower_up(self) -> bool:
        try:
            return bool(http_get(self.flower("/healthcheck")))
        except OSError:
            return False

    def flower(self, path: str) -> str:
        return f"http://127.0.0.1:{self.flower_port}{path}"

    def tasks(self) -> dict:
        return json.loads(http_get(self.flower("/api/tasks?taskname=mii.generate")))

    def control(self, command: str) -> list:
        app = make_app(self.redis.url)
        return app.control.broadcast(command, reply=True, timeout=5.0)

    def stop(self) -> None:
        for p in self.processes:
            p.terminate()
        for p in self.processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        self.redis.stop()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    f = Fleet(tmp_path_factory.mktemp("celery"))
    try:
        yield f.start()
    finally:
        f.stop()


@pytest.fixture(scope="module")
def client(fleet):
    os.environ["MII_REDIS_URL"] = fleet.redis.url
    try:
        yield mii.client(DEPLOYMENT)
    finally:
        os.environ.pop("MII_REDIS_URL", None)


def test_flower_refuses_requests_without_the_password(fleet):
    with pytest.raises(urllib.error.HTTPError) as err:
        http_get(fleet.flower("/api/workers"), auth=None)
    assert err.value.code == 401


def test_worker_is_online_in_flower_with_engine_statistics(fleet, client):
    client.generate("warm up", max_new_tokens=4, do_sample=False)
    workers = json.loads(http_get(fleet.flower("/api/workers?refresh=1")))
    (name,) = [n for n in workers if n.startswith("mii-celery-dep-0@")]
    stats = workers[name]["stats"]["mii"]
    assert stats["deployment"] == DEPLOYMENT and stats["state"] == "serving"
    assert stats["engine"]["kv_blocks_total"] > 0
    assert stats["engine"]["tokens_generated"] >= 4
    assert set(stats["queue_depth"]) == {"requests", "bulk"}


def test_requests_appear_as_succeeded_and_failed_generate_tasks(fleet, client):
    before = fleet.tasks()
    out = client.generate(["one", "two", "three"], max_new_tokens=6, min_new_tokens=6,
                          do_sample=False)  # fmt: skip
    assert [r.generated_length for r in out] == [6, 6, 6]
    with pytest.raises(mii.errors.InvalidRequestError):
        client.generate("x" * 3000, max_new_tokens=4)

    def new_tasks():
        tasks = {k: v for k, v in fleet.tasks().items() if k not in before}
        done = [t for t in tasks.values() if t["state"] in ("SUCCESS", "FAILURE")]
        return tasks if len(done) >= 4 else None

    tasks = wait_for(new_tasks, 30, "four finished mii.generate tasks in Flower")
    succeeded = [t for t in tasks.values() if t["state"] == "SUCCESS"]
    failed = [t for t in tasks.values() if t["state"] == "FAILURE"]
    assert len(succeeded) == 3 and len(failed) == 1
    for task in succeeded:
        assert task["name"] == "mii.generate" and task["runtime"] >= 0
        assert json.loads(task["result"].replace("'", '"'))["tokens"] == 6
        assert task["worker"].startswith("mii-celery-dep-0@")
    assert "context" in failed[0]["exception"]


def test_pause_through_remote_control_holds_new_work_and_loses_nothing(fleet, client):
    results: dict[str, list] = {}

    def generate(key: str, prompt: str, n: int) -> None:
        results[key] = client.generate(prompt, max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False)  # fmt: skip

    in_flight = threading.Thread(target=generate, args=("long", "a long one", 600))
    in_flight.start()
    wait_for(lambda: _mii_stats(fleet)["active_requests"] == 1, 20, "the long request to start")
    replies = fleet.control("mii_pause")
    assert [list(r.values())[0]["ok"] for r in replies] == ["paused"]
    held = threading.Thread(target=generate, args=("held", "held back", 5))
    held.start()
    in_flight.join(60)
    assert results["long"][0].generated_length == 600  # in-flight work finished
    time.sleep(1.0)
    assert "held" not in results and _mii_stats(fleet)["queue_depth"]["requests"] == 1
    fleet.control("mii_resume")
    held.join(30)
    assert results["held"][0].generated_length == 5


def test_prometheus_metrics_from_the_worker_and_from_flower(fleet):
    worker = http_get(f"http://127.0.0.1:{fleet.metrics_port}/metrics", auth=None).decode()
    assert 'mii_kv_blocks_total{deployment="celery-dep",replica="0"}' in worker
    assert "mii_tokens_generated_total" in worker
    flower = http_get(fleet.flower("/metrics")).decode()
    assert "flower_events_total" in flower


def _mii_stats(fleet) -> dict:
    (reply,) = fleet.control("mii_stats")
    return list(reply.values())[0]
