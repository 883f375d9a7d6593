"""Integration: the launcher's lifecycle with worker processes running the fake engine
(fast): embedded Redis, clients in other processes, a worker that cannot start, SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import pytest
import redis as redis_py
from fake_engine import expected_text
from harness import wait_for
from redis_server import RedisServer

import mii
from mii.broker_config.deployment import read_workers, remembered_url
from mii.broker_config.keys import WORKER_GROUP
from mii.config import MIIConfig
from mii.constants import GenerationFinishReason as Reason
from mii.errors import DeploymentNotFoundError, MIIError
from mii.worker import launcher
from mii.worker.embedded_redis import free_port, redis_server_binary
from mii.worker.launcher import serve_deployment

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]
FAKE = "fake_engine:make_fake_engine"
HERE = os.path.dirname(__file__)


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    """Worker processes import the fake engine from this folder; local notes go to tmp."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([HERE, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MII_REDIS_URL", raising=False)


@pytest.fixture(scope="module")
def server():
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    srv = RedisServer().start()
    yield srv
    srv.stop()


def _config(name: str, **fields) -> MIIConfig:
    return MIIConfig(model_config={"model_name_or_path": "fake"}, deployment_name=name, **fields)


def test_embedded_redis_serves_clients_in_other_processes(worker_env, monkeypatch):
    # no URL given and nothing answering at the default address: embed one
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    client = serve_deployment(_config("embedded-dep"), engine_factory=FAKE)
    embedded = client._owner.redis
    try:
        assert embedded is not None and remembered_url("embedded-dep") == embedded.url
        code = "import mii; c = mii.client('embedded-dep'); print(c('hi', max_new_tokens=4)[0])"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == expected_text("hi", 4), out.stderr
    finally:
        client.terminate_server(timeout_s=20)
    assert embedded.process.wait(10) is not None
    assert all(w.exit_code() is not None for w in client._owner.workers)
    assert remembered_url("embedded-dep") is None


def test_embedded_binary_is_recent_enough():
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True)
    version = out.stdout.split("v=")[1].split()[0]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (6, 2)  # XAUTOCLAIM


def test_a_worker_that_cannot_start_fails_serve_with_its_log(worker_env, server):
    config = MIIConfig(
        model_config={"model_name_or_path": "/nonexistent/model"},
        deployment_name="broken-dep",
        redis_url=server.url,
    )
    with pytest.raises(MIIError, match="failed to start.*nonexistent") as info:
        serve_deployment(config)
    assert "last lines of" in str(info.value)


def test_sigterm_drains_in_flight_work(worker_env, server, monkeypatch):
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.01")
    client = serve_deployment(_config("drain-dep", redis_url=server.url), engine_factory=FAKE)
    try:
        requests = client._submit(["drain me"], {"max_new_tokens": 200})
        wait_for(
            lambda: client.redis.xpending(client.keys.requests, WORKER_GROUP)["pending"],
            what="request taken",
        )
        (worker,) = client._owner.workers
        worker.process.send_signal(signal.SIGTERM)
        for _ in client._follow(requests):
            pass
        (response,) = requests.responses()
        assert response.finish_reason == Reason.LENGTH and response.generated_length == 200
        assert worker.process.wait(20) == 0
        assert read_workers(client.redis, client.keys) == {}
    finally:
        client.terminate_server(timeout_s=10)


def test_refused_twice_and_terminated_from_another_client(worker_env, server):
    client = serve_deployment(_config("dup-dep", redis_url=server.url), engine_factory=FAKE)
    try:
        with pytest.raises(MIIError, match="already served"):
            serve_deployment(_config("dup-dep", redis_url=server.url), engine_factory=FAKE)
        other = mii.client("dup-dep", redis_url=server.url)  # not the launcher's client
        assert other.mii_config.deployment_name == "dup-dep"
        other.terminate_server(timeout_s=20)
        (worker,) = client._owner.workers
        assert worker.process.wait(20) == 0
        with pytest.raises(DeploymentNotFoundError):
            mii.client("dup-dep", redis_url=server.url)
    finally:
        client.terminate_server(timeout_s=10)


def test_acl_user_with_password(worker_env, server):
    admin = redis_py.Redis.from_url(server.url)
    admin.acl_setuser(
        "mii-app", enabled=True, passwords=["+s3cret"], keys=["mii:*"], commands=["+@all"]
    )
    url = f"redis://mii-app:s3cret@127.0.0.1:{server.port}/0"
    client = serve_deployment(_config("acl-dep", redis_url=url), engine_factory=FAKE)
    try:
        assert client.generate("acl", max_new_tokens=3)[0].generated_text == expected_text("acl", 3)
        assert b"s3cret" not in admin.get(client.keys.config)  # URLs are not recorded
        bad = url.replace("s3cret", "wrong")
        with pytest.raises(redis_py.AuthenticationError):
            serve_deployment(_config("acl-dep-2", redis_url=bad), engine_factory=FAKE)
    finally:
        client.terminate_server(timeout_s=10)
