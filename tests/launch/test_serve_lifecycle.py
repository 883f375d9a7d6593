"""Integration: the launcher's lifecycle with worker processes running the fake engine
(fast): embedded Redis (with a password), clients in other processes, starts that fail
(a worker that cannot start, a timeout, Ctrl-C) and leave nothing behind, SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
import redis as redis_py
from fake_engine import expected_text
from harness import wait_for
from serving import FAKE, fake_config

import mii
from mii.broker_config.deployment import read_workers, remembered_url
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.cli import main
from mii.config import MIIConfig
from mii.constants import GenerationFinishReason as Reason
from mii.errors import DeploymentNotFoundError, MIIError
from mii.launch import serve as launcher
from mii.launch.embedded_redis import free_port, redis_server_binary
from mii.launch.serve import serve_deployment

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


@pytest.fixture
def server(private_redis):
    return private_redis


def test_embedded_redis_serves_clients_in_other_processes(worker_env, monkeypatch, tmp_path,
                                                         caplog):  # fmt: skip
    # no URL given and nothing answering at the default address: embed one
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    caplog.set_level(logging.INFO)
    client = serve_deployment(fake_config("embedded-dep"), engine_factory=FAKE)
    embedded = client.local.redis
    try:
        assert embedded is not None and remembered_url("embedded-dep") == embedded.url
        with pytest.raises(redis_py.AuthenticationError):  # a generated password
            redis_py.Redis(port=embedded.port).ping()
        note = tmp_path / "deployments" / "embedded-dep.json"
        assert stat.S_IMODE(note.stat().st_mode) == 0o600
        assert stat.S_IMODE(note.parent.stat().st_mode) == 0o700
        code = (  # a local client finds it, then ends it
            "import mii; c = mii.client('embedded-dep'); print(c('hi', max_new_tokens=4)[0]); "
            "c.terminate_server()"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert out.stdout.strip() == expected_text("hi", 4), out.stderr
        assert embedded.process.wait(10) is not None
        client.wait_for_workers(threading.Event())  # what `mii serve` waits on: it returns
    finally:
        client.local.stop_workers(timeout_s=5)
        client.local.stop_redis()
    assert all(w.exit_code() is not None for w in client.local.workers)
    assert remembered_url("embedded-dep") is None
    assert "redis://:***@127.0.0.1" in caplog.text and embedded.password not in caplog.text


def test_embedded_binary_is_recent_enough():
    out = subprocess.run([redis_server_binary(), "--version"], capture_output=True, text=True)
    version = out.stdout.split("v=")[1].split()[0]
    assert tuple(int(x) for x in version.split(".")[:2]) >= (6, 2)  # XAUTOCLAIM


def test_a_worker_that_cannot_start_fails_serve_with_its_log(worker_env, server, capsys):
    config = MIIConfig(
        model_config={"model_name_or_path": "/nonexistent/model"},
        deployment_name="broken-dep",
        redis_url=server.url,
    )
    with pytest.raises(MIIError, match="failed to start.*nonexistent") as info:
        serve_deployment(config)
    assert "last lines of" in str(info.value)
    assert _deployment_keys(server, "broken-dep") == []
    assert main(["generate", "broken-dep", "hi", "--redis-url", server.url]) == 1  # no hang
    assert "no deployment named 'broken-dep'" in capsys.readouterr().err


def test_a_failed_start_with_embedded_redis_forgets_it(worker_env, monkeypatch):
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    config = fake_config("timeout-dep")
    with pytest.raises(MIIError, match="not ready after"):
        serve_deployment(config, engine_factory=FAKE, ready_timeout_s=0.2)
    assert remembered_url("timeout-dep") is None
    with pytest.raises(DeploymentNotFoundError):
        mii.client("timeout-dep")


def test_ctrl_c_during_start_leaves_nothing_behind(worker_env, server, monkeypatch):
    monkeypatch.setenv("MII_FAKE_LOAD_DELAY", "30")  # the start is still under way at Ctrl-C
    code = (
        # A shell that runs the tests in the background starts its children with SIGINT
        # ignored, and Python keeps that: Ctrl-C must raise KeyboardInterrupt here.
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "import sys; from serving import FAKE, fake_config; "
        "from mii.launch.serve import serve_deployment; "
        f"serve_deployment(fake_config('ctrl-c-dep', redis_url={server.url!r}), FAKE)"
    )
    launch = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    redis = redis_py.Redis.from_url(server.url)
    keys = DeploymentKeys("ctrl-c-dep")
    try:
        wait_for(lambda: redis.hlen(keys.workers), 30, "a worker to start starting")
        launch.send_signal(signal.SIGINT)
        try:
            code = launch.wait(60)  # the worker gets 5 s to stop, then SIGKILL
        except subprocess.TimeoutExpired:
            launch.kill()
            pytest.fail(f"serve did not stop after Ctrl-C:\n{launch.communicate()[1][-3000:]}")
        assert code != 0
    finally:
        launch.kill()
        for pid in _worker_pids("ctrl-c-dep"):  # none, unless the test failed
            os.kill(pid, signal.SIGKILL)
    assert "KeyboardInterrupt" in launch.stderr.read()
    assert _deployment_keys(server, "ctrl-c-dep") == []
    assert not _worker_processes("ctrl-c-dep")


def _deployment_keys(server, name: str) -> list[bytes]:
    return redis_py.Redis.from_url(server.url).keys(f"{DeploymentKeys(name).prefix}:*")


def _worker_pids(deployment: str) -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if f"--deployment {deployment} " in line]  # fmt: skip


def _worker_processes(deployment: str) -> list[str]:
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if f"--deployment {deployment} " in line]


def test_sigterm_drains_in_flight_work(worker_env, server, monkeypatch):
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.01")
    client = serve_deployment(fake_config("drain-dep", redis_url=server.url), engine_factory=FAKE)
    try:
        requests = client.submit(["drain me"], max_new_tokens=200)
        wait_for(
            lambda: client.redis.xpending(client.keys.requests, WORKER_GROUP)["pending"],
            what="request taken",
        )
        (worker,) = client.local.workers
        worker.process.send_signal(signal.SIGTERM)
        requests.wait()
        (response,) = requests.responses()
        assert response.finish_reason == Reason.LENGTH and response.generated_length == 200
        assert worker.process.wait(20) == 0
        statuses = read_workers(client.redis, client.keys).values()
        assert worker.pid not in [s["pid"] for s in statuses]  # it left, nothing to reclaim
    finally:
        client.terminate_server(timeout_s=10)


def test_refused_twice_and_terminated_from_another_client(worker_env, server):
    client = serve_deployment(fake_config("dup-dep", redis_url=server.url), engine_factory=FAKE)
    try:
        with pytest.raises(MIIError, match="already served"):
            serve_deployment(fake_config("dup-dep", redis_url=server.url), engine_factory=FAKE)
        other = mii.client("dup-dep", redis_url=server.url)  # not the launcher's client
        assert other.mii_config.deployment_name == "dup-dep"
        other.terminate_server(timeout_s=20)
        (worker,) = client.local.workers
        assert worker.process.wait(20) == 0
        client.wait_for_workers(threading.Event())  # returns: nothing is restarted
        assert client.local.workers == [worker]
        with pytest.raises(DeploymentNotFoundError):
            mii.client("dup-dep", redis_url=server.url)
    finally:
        client.terminate_server(timeout_s=10)


ACL_KEYS = ["mii:*", "mii.*", "mii-*", "_kombu.*", "unacked*", "celery*", "*.pidbox"]


def test_acl_user_with_password(worker_env, server):
    admin = redis_py.Redis.from_url(server.url)
    admin.acl_setuser(  # the README's patterns: mii's keys and Celery's (kombu's)
        "mii-app", enabled=True, passwords=["+s3cret"], keys=ACL_KEYS, channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    url = f"redis://mii-app:s3cret@127.0.0.1:{server.port}/0"
    client = serve_deployment(fake_config("acl-dep", redis_url=url), engine_factory=FAKE)
    try:
        assert client.generate("acl", max_new_tokens=3)[0].generated_text == expected_text("acl", 3)
        time.sleep(3)  # Celery's consumer has started and used its keys by now
        assert all(w.exit_code() is None for w in client.local.workers)
        assert "NoPermission" not in client.local.workers[0].log_tail(200)
        assert b"s3cret" not in admin.get(client.keys.config)  # URLs are not recorded
        bad = url.replace("s3cret", "wrong")
        with pytest.raises(redis_py.AuthenticationError):
            serve_deployment(fake_config("acl-dep-2", redis_url=bad), engine_factory=FAKE)
    finally:
        client.terminate_server(timeout_s=10)
