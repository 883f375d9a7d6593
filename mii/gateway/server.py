"""Running a gateway: in this process (`serve`, what `mii gateway` calls), or as a child
process beside a deployment's workers (`spawn_gateway`, what `mii.serve(...,
enable_restful_api=True)` calls; `terminate_server` stops it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mii.broker_config.settings import REDIS_URL_ENV
from mii.errors import MIIError
from mii.gateway.settings import GatewaySettings

READY_TIMEOUT_S = 60.0
SETTINGS_ENV = "MII_GATEWAY_SETTINGS"
"""The settings (JSON) of the processes of a gateway started with `workers` > 1."""


def serve(settings: GatewaySettings, log_level: str = "info", workers: int = 1) -> None:
    """Serve until SIGINT / SIGTERM (uvicorn finishes open streams for a few seconds).
    `workers` > 1: that many processes share the port (one Python process streams a few
    thousand tokens/s; the gateway keeps no state, so processes scale it over cores).
    Each process counts its own metrics."""
    import uvicorn

    options = dict(host=settings.host, port=settings.port, log_level=log_level,
                   timeout_graceful_shutdown=10)  # fmt: skip
    if workers > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run("mii.gateway.server:app_from_env", factory=True, workers=workers, **options)
        return
    from mii.gateway.app import create_app

    uvicorn.run(create_app(settings), **options)


def app_from_env():
    """The app factory of each process of a multi-process gateway."""
    from mii.gateway.app import create_app

    return create_app(GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV]))


@dataclass
class GatewayProcess:
    process: subprocess.Popen
    url: str
    log_path: str

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def spawn_gateway(deployment: str, redis_url: str, host: str, port: int,
                  extra_args: tuple[str, ...] = ()) -> GatewayProcess:  # fmt: skip
    """`mii gateway` in a child process; returns once it answers `/healthz`. The Redis URL
    travels in the environment, so its password stays out of `ps`."""
    log_dir = tempfile.mkdtemp(prefix=f"mii-gateway-{deployment.replace('/', '_')}-")
    log_path = os.path.join(log_dir, "gateway.log")
    cmd = [sys.executable, "-m", "mii.gateway", deployment, "--host", host, "--port", str(port)]
    env = {**os.environ, REDIS_URL_ENV: redis_url, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*cmd, *extra_args], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
    gateway = GatewayProcess(process, f"http://{host}:{port}", log_path)
    try:
        wait_until_up(gateway, READY_TIMEOUT_S)
    except BaseException:
        gateway.stop(timeout_s=5)
        raise
    return gateway


def wait_until_up(gateway: GatewayProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gateway.process.poll() is not None:
            raise MIIError(f"the gateway exited with code {gateway.process.returncode}:\n"
                           f"{gateway.log_tail()}")  # fmt: skip
        try:
            with urllib.request.urlopen(f"{gateway.url}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise MIIError(f"the gateway did not answer within {timeout_s:.0f}s:\n{gateway.log_tail()}")
