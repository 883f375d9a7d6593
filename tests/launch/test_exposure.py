"""Secrets and exposure: the Redis password is never printed or logged (`mii serve`, the
launcher, the workers), worker metrics listen on loopback unless told otherwise, and
Flower's `/metrics` asks for the basic auth like every other page (a real Flower)."""

from __future__ import annotations

import base64
import logging
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import redis as redis_py
from harness import wait_for
from serving import FAKE, fake_config

import mii
from mii.broker_config.keys import DeploymentKeys
from mii.cli import build_parser, main
from mii.launch.embedded_redis import free_port
from mii.launch.serve import serve_deployment
from mii.worker.celery.app import make_app
from mii.worker.celery.metrics import serve_metrics

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
PASSWORD = "s3cret-pw"
AUTH = "ops:flower-pw"


@pytest.fixture(scope="module")
def password_url(private_redis) -> str:
    admin = redis_py.Redis.from_url(private_redis.url)
    admin.acl_setuser(  # Celery's events and remote control need the pub/sub channels
        "mii-ops", enabled=True, passwords=[f"+{PASSWORD}"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    return f"redis://mii-ops:{PASSWORD}@127.0.0.1:{private_redis.port}/0"


def test_mii_serve_never_shows_the_password(worker_env, password_url, monkeypatch, capsys,
                                            caplog):  # fmt: skip
    caplog.set_level(logging.INFO)
    served = []

    def serve(model, **options):
        config = fake_config("secret-dep", redis_url=options["redis_url"])
        served.append(serve_deployment(config, engine_factory=FAKE))
        return served[-1]

    monkeypatch.setattr(mii, "serve", serve)
    logs: list[str] = []  # a clean terminate removes the log folder: read it before
    stopper = threading.Thread(
        target=_terminate_when_ready, args=(password_url, served, logs), daemon=True
    )
    stopper.start()
    previous = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["serve", "fake", "--redis-url", password_url]) == 0  # ends on terminate
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = capsys.readouterr().out
    assert "serving secret-dep at redis://mii-ops:***@127.0.0.1:" in out
    (worker_log,) = logs
    assert "transport:   redis://mii-ops:**@127.0.0.1" in worker_log  # Celery's banner
    for text in (out, caplog.text, worker_log):
        assert PASSWORD not in text


def _terminate_when_ready(url: str, served: list, logs: list[str]) -> None:
    keys = DeploymentKeys("secret-dep")
    redis = redis_py.Redis.from_url(url)
    wait_for(lambda: redis.hget(keys.state, "state") == b"serving", 30, "the deployment")
    # The deployment says "serving" before mii.serve returns its client: wait for that too
    # (reading served[0] at once failed now and then, and nothing terminated the serve).
    wait_for(lambda: served, 30, "mii.serve to return")
    (worker,) = served[0].local.workers
    logs.append(wait_for(lambda: _banner_logged(worker.log_path), 30, "Celery's banner"))
    mii.client("secret-dep", redis_url=url).terminate_server(timeout_s=20)


def _banner_logged(path: str) -> str | None:
    with open(path) as log:
        text = log.read()
    return text if "transport:" in text else None


def _listening_address(port: int) -> str:
    """The local address of the TCP socket listening on `port` (from /proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for row in table.read().splitlines()[1:]:
            local, state = row.split()[1], row.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":
                return ".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0))
    raise AssertionError(f"nothing listens on {port}")


class _Step:
    def statistics(self) -> dict:
        return {"deployment": "d", "replica": 0, "engine": {"num_running": 1}}


@pytest.mark.parametrize("address", [None, "0.0.0.0"])
def test_worker_metrics_listen_on_loopback_unless_widened(address):
    port = free_port()
    server, thread = serve_metrics(_Step(), port, address)
    try:
        assert _listening_address(port) == (address or "127.0.0.1")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            assert b"mii_num_running" in reply.read()
    finally:
        server.shutdown()
        server.server_close()


def test_metrics_address_is_an_option_of_mii_worker_and_of_celery():
    args = build_parser().parse_args(["worker", "--deployment", "d", "--metrics-address", "::"])
    assert args.metrics_address == "::"
    options = {o.name for o in make_app("redis://127.0.0.1:1/0").user_options["worker"]}
    assert "metrics_address" in options


def _get(url: str, auth: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as err:
        return err.code, b""
    except OSError:  # not listening yet
        return 0, b""


def test_flower_metrics_need_the_basic_auth(private_redis, tmp_path):
    port = free_port()
    env = {**os.environ, "MII_REDIS_URL": private_redis.url}
    with open(tmp_path / "flower.log", "wb") as log:
        flower = subprocess.Popen(
            [sys.executable, "-m", "mii", "flower", "--basic-auth", AUTH, "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _get(f"{base}/healthcheck", None)[0] == 200, 30, "Flower to answer")
        assert _get(f"{base}/metrics", None)[0] == 401
        assert _get(f"{base}/metrics", "ops:wrong")[0] == 401
        status, body = _get(f"{base}/metrics", AUTH)
        assert status == 200 and b"flower_events_total" in body
    finally:
        flower.terminate()
        flower.wait(10)
