"""Shared fixtures: tiny random models of every architecture, the demo model; for the
serving tests, a worker loop on fakeredis (`harness`), worker processes with the fake
engine (`worker_env`), a private redis-server (`private_redis`), a local Redis Cluster
(`redis_cluster`). The worker's fakes live in tests/worker/ (fake_engine.py, harness.py,
redis_server.py, redis_cluster.py, serving.py)."""

from __future__ import annotations

import os
import shutil
import sys

import pytest
import torch

WORKER_FAKES = os.path.join(os.path.dirname(__file__), "worker")
sys.path.insert(0, WORKER_FAKES)

from harness import Harness  # noqa: E402
from tiny_models import tiny_model_maker  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> folder of a tiny random HF model of that architecture."""
    return tiny_model_maker(tmp_path_factory)


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real demo model (fetched and converted on first use, then cached)."""
    from mii.engine.demo_model import ensure_demo_model

    return str(ensure_demo_model("smollm2", quiet=True))


@pytest.fixture(autouse=True)
def _cpu_threads():
    # Two cores on CI: more threads than cores only adds contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    """For tests that start worker processes: they import the fake engine from
    tests/worker; local deployment notes go to tmp; no Redis URL leaks in from the
    environment."""
    path = os.pathsep.join([WORKER_FAKES, os.environ.get("PYTHONPATH", "")])
    monkeypatch.setenv("PYTHONPATH", path)
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


@pytest.fixture(scope="session")
def redis_cluster():
    """A Redis Cluster of three primaries with a replica each, on free ports, for the whole
    session (a test that kills a primary leaves its promoted replica serving)."""
    from redis_cluster import RedisCluster

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.skip("needs redis-server and redis-cli")
    cluster = RedisCluster().start()
    yield cluster
    cluster.stop()
