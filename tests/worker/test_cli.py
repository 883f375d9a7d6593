"""The `mii` command: subcommands dispatch, errors are one clear line."""

from __future__ import annotations

import shutil

import pytest
from redis_server import RedisServer

from mii.cli import COMMANDS, build_parser, main

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
