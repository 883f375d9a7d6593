"""The docker-compose file is valid and wires Redis, workers and Flower as documented."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    plugin = docker and subprocess.run([docker, "compose", "version"], capture_output=True)
    if plugin and plugin.returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.mark.skipif(compose_command() is None, reason="neither docker compose nor docker-compose")
def test_compose_config_is_valid_and_complete():
    env = {**os.environ, "REDIS_PASSWORD": "pw", "FLOWER_AUTH": "ops:secret"}
    out = subprocess.run([*compose_command(), "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    config = out.stdout
    assert "noeviction" in config and "--appendonly" in config and "requirepass" in config
    assert "redis://:pw@redis:6379/0" in config
    assert "MII_FLOWER_AUTH: ops:secret" in config
    assert "capabilities:" in config and "nvidia" in config


def test_compose_refuses_to_start_without_passwords():
    command = compose_command()
    if command is None:
        pytest.skip("neither docker compose nor docker-compose")
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_PASSWORD", "FLOWER_AUTH")}
    out = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)  # fmt: skip
    assert out.returncode != 0
    assert "REDIS_PASSWORD" in out.stderr
