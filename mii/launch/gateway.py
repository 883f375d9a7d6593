"""The gateway as a child process beside a deployment's workers: what `mii.serve(...,
enable_restful_api=True)` starts (`mii gateway` in a process of its own) and
`terminate_server` stops."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass

from mii.broker_config.settings import REDIS_URL_ENV
from mii.errors import MIIError
from mii.launch.child import ChildProcess
from mii.launcher_env import without_launcher

READY_TIMEOUT_S = 60.0


@dataclass
class GatewayProcess(ChildProcess):
    url: str = ""


def spawn_gateway(deployment: str, redis_url: str, host: str, port: int,
                  extra_args: tuple[str, ...] = (), log_dir: str | None = None,
                  ) -> GatewayProcess:  # fmt: skip
    """`mii gateway` in a child process; returns once it answers `/healthz`. The Redis URL
    travels in the environment, so its password stays out of `ps`. Its log goes to
    `log_dir` (default: a new temporary folder)."""
    log_dir = log_dir or tempfile.mkdtemp(prefix=f"mii-gateway-{deployment.replace('/', '_')}-")
    log_path = os.path.join(log_dir, "gateway.log")
    cmd = [sys.executable, "-m", "mii.gateway", deployment, "--host", host, "--port", str(port)]
    env = {**without_launcher(os.environ), REDIS_URL_ENV: redis_url, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        process = subprocess.Popen([*cmd, *extra_args], stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, env=env)  # fmt: skip
    gateway = GatewayProcess(process, log_path, f"http://{host}:{port}")
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
