"""The `mii` command: subcommands dispatch, errors are one clear line."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import redis as redis_py
from redis_server import RedisServer

from mii.broker_config.keys import DeploymentKeys
from mii.cli import COMMANDS, build_parser, main
from mii.launch.embedded_redis import free_port

pytestmark = pytest.mark.timeout(60)


def test_subcommands_parse():
    assert {"serve", "generate", "terminate"} <= set(COMMANDS)
    args = build_parser().parse_args(["generate", "dep", "hello", "--max-new-tokens", "5"])
    assert (args.deployment, args.prompt, args.max_new_tokens) == ("dep", "hello", 5)
    assert args.run is COMMANDS["generate"][1]


@pytest.mark.redis
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_unknown_deployment_is_one_clear_line(capsys):
    server = RedisServer().start()
    try:
        assert main(["generate", "no-such-dep", "hi", "--redis-url", server.url]) == 1
    finally:
        server.stop()
    assert "no deployment named 'no-such-dep'" in capsys.readouterr().err


# ---- user errors are one line, never a traceback, never a hang (issue 12, item 8) -----


@pytest.fixture(scope="module")
def redis_url():
    if shutil.which("redis-server") is None:
        pytest.skip("needs redis-server")
    server = RedisServer().start()
    yield server.url
    server.stop()


def _record(url: str, name: str, **broker) -> DeploymentKeys:
    from mii.broker_config.deployment import DeploymentRecord, save_record
    from mii.config import MIIConfig

    config = MIIConfig(model_config={"model_name_or_path": "fake"}, deployment_name=name,
                       broker=broker)  # fmt: skip
    keys = DeploymentKeys(name)
    record = DeploymentRecord(mii_config=config.model_dump(mode="json", by_alias=True))
    save_record(redis_py.Redis.from_url(url), keys, record)
    return keys


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_non_utf8_arguments_are_one_line(capsys):
    assert main(["generate", "dep", "caf\udce9"]) == 2
    assert "argument b'caf\\xe9' is not valid UTF-8" in _one_line_error(capsys)


def test_a_bad_redis_url_is_one_line_without_its_password(capsys):
    assert main(["generate", "dep", "hi", "--redis-url", "http://u:pw123@x"]) == 1
    err = _one_line_error(capsys)
    assert "must start with redis://" in err and "pw123" not in err


def test_an_unreachable_redis_is_one_line(capsys):
    url = f"redis://127.0.0.1:{free_port()}/0"
    assert main(["terminate", "dep", "--redis-url", url]) == 1
    assert "no Redis answers at" in _one_line_error(capsys)


def test_bad_model_options_are_one_line(capsys):
    assert main(["serve", "fake", "--max-length", "-5"]) == 1
    assert "invalid ModelConfig: max_length: Input should be greater than 0" in (
        _one_line_error(capsys)
    )


@pytest.mark.redis
def test_generate_to_a_failed_deployment_is_one_line(redis_url, capsys):
    keys = _record(redis_url, "failed-dep")
    failed = {"state": "failed", "error": "boom"}
    redis_py.Redis.from_url(redis_url).hset(keys.state, mapping=failed)
    assert main(["generate", "failed-dep", "hi", "--redis-url", redis_url]) == 1
    assert "'failed-dep' failed: boom" in _one_line_error(capsys)


@pytest.mark.redis
def test_generate_without_workers_ends_at_the_default_timeout(redis_url, capsys, monkeypatch):
    from mii.producer import request_set

    monkeypatch.setattr(request_set, "DEADLINE_GRACE_S", 0.1)
    _record(redis_url, "idle-dep", request_timeout_s=0.3)
    start = time.monotonic()
    assert main(["generate", "idle-dep", "hi", "--redis-url", redis_url]) == 1
    assert time.monotonic() - start < 5
    err = capsys.readouterr().err
    assert "no live worker serves idle-dep; the request waits up to 0.3s" in err
    assert "no answer within its timeout of 0.3s" in err and "Traceback" not in err


@pytest.mark.redis
def test_generate_whose_request_was_flushed_ends_with_one_line(redis_url, capsys):
    _record(redis_url, "flushed-dep", lost_request_grace_s=0.3)
    flush = threading.Timer(0.2, redis_py.Redis.from_url(redis_url).flushall)
    flush.start()
    start = time.monotonic()
    assert main(["generate", "flushed-dep", "hi", "--redis-url", redis_url]) == 1
    assert time.monotonic() - start < 5
    flush.join()
    err = capsys.readouterr().err
    assert "vanished from Redis" in err and "Traceback" not in err
