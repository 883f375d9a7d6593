"""Worker and producer unit tests run a real `WorkerLoop` on fakeredis (see harness.py)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import Harness  # noqa: E402


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    """For tests that start worker processes: they import the fake engine from this folder;
    local deployment notes go to tmp; no Redis URL leaks in from the environment."""
    here = os.path.dirname(__file__)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MII_REDIS_URL", raising=False)


@pytest.fixture(scope="module")
def private_redis():
    """A redis-server of this test module's own (tests may restart, flush or ACL it)."""
    from redis_server import RedisServer

    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisServer().start()
    yield server
    server.stop()
