"""The command line's configuration: every ModelConfig, MIIConfig and broker setting is an
option of `mii serve` and `mii worker` with help text, and an MII_* variable; a bad value
is one line; `mii generate --chat` leaves the template to the worker; `mii --help` is fast."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from bulk_engine import CountingEngine, chat_text
from fake_engine import expected_text

import mii
from mii.broker_config.settings import BrokerSettings
from mii.cli import build_parser, main
from mii.config import MIIConfig, ModelConfig
from mii.config_options import NOT_OPTIONS, serve_kwargs

pytestmark = pytest.mark.timeout(60)


def _help(command: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mii", command, "--help"], capture_output=True,
                         text=True, timeout=30, env={"COLUMNS": "200"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_every_setting_is_an_option_with_help(command):
    text = _help(command)
    skip = NOT_OPTIONS | ({"deployment_name", "redis_url"} if command == "worker" else set())
    for config in (ModelConfig, MIIConfig, BrokerSettings):
        for name, field in config.model_fields.items():
            if name in skip:
                continue
            flag = "--" + name.replace("_", "-")
            assert flag in text and f"MII_{name.upper()}" in text, name
            assert field.description, f"{config.__name__}.{name} has no help text"
    assert "--max-queue-depth N" in text and "--no-enable-prefix-caching" in text


def _serve_args(*argv: str):
    return serve_kwargs(build_parser("serve").parse_args(["serve", "m", *argv]))


def test_options_win_over_the_environment_which_wins_over_defaults(monkeypatch):
    monkeypatch.setenv("MII_MAX_LENGTH", "512")
    monkeypatch.setenv("MII_REPLICA_NUM", "3")
    monkeypatch.setenv("MII_ENFORCE_EAGER", "true")
    monkeypatch.setenv("MII_INFERENCE_ENGINE_CONFIG", '{"state_manager": {"max_context": 64}}')
    monkeypatch.setenv("MII_MAX_QUEUE_DEPTH", "none")
    kwargs = _serve_args("--replica-num", "2", "--no-enable-prefix-caching",
                         "--reclaim-idle-s", "40", "--device-map", '{"h": [[0]]}')  # fmt: skip
    assert kwargs["max_length"] == 512 and kwargs["replica_num"] == "2"
    assert kwargs["enforce_eager"] is True and kwargs["enable_prefix_caching"] is False
    assert kwargs["inference_engine_config"] == {"state_manager": {"max_context": 64}}
    assert kwargs["broker"] == {"max_queue_depth": None, "reclaim_idle_s": "40"}
    assert kwargs["device_map"] == {"h": [[0]]}
    config = MIIConfig(model_config=ModelConfig(model_name_or_path="m", **{
        k: v for k, v in kwargs.items() if k in ModelConfig.model_fields}),
        broker=kwargs["broker"])  # fmt: skip
    assert (config.model_conf.replica_num, config.broker.reclaim_idle_s) == (2, 40.0)
    assert config.broker.max_queue_depth is None


def test_nothing_given_means_mii_serves_defaults(monkeypatch):
    for name in ("MII_REDIS_URL", "MII_MAX_LENGTH"):
        monkeypatch.delenv(name, raising=False)
    assert _serve_args() == {}


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_a_config_error_is_one_line(capsys, monkeypatch):
    assert main(["serve", "fake", "--replica-num", "0"]) == 1
    assert "invalid ModelConfig: replica_num: Input should be greater than 0" in _one_line(capsys)
    assert main(["serve", "fake", "--heartbeat-interval-s", "60"]) == 1
    assert "heartbeat_interval_s (60.0) must be at most half of reclaim_idle_s" in (
        _one_line(capsys)
    )
    monkeypatch.setenv("MII_BLOCK_SIZE", "many")
    assert main(["serve", "fake"]) == 1
    assert "block_size" in _one_line(capsys)


def test_worker_config_options_need_a_model(capsys):
    assert main(["worker", "--deployment", "d", "--max-length", "64"]) == 1
    assert "--max-length: config options apply only with --model" in _one_line(capsys)


def test_worker_records_what_its_options_say(monkeypatch):
    from mii.worker.celery import cli as worker_cli

    monkeypatch.setenv("MII_MAX_DELIVERIES", "7")
    args = build_parser("worker").parse_args(
        ["worker", "--deployment", "d", "--model", "m", "--tensor-parallel", "2"]
    )
    config = worker_cli._mii_config(args)
    assert config.deployment_name == "d" and config.model_conf.tensor_parallel == 2
    assert config.broker.max_deliveries == 7


def test_generate_chat_sends_messages_for_the_workers_template(harness, monkeypatch, capsys):
    from mii.engine import loader

    def no_model_files(*_):
        raise AssertionError("the client host looked for the model")

    monkeypatch.setattr(loader, "resolve_model_path", no_model_files)
    harness.start(CountingEngine())
    monkeypatch.setattr(mii, "client", lambda *a, **k: harness.client())
    assert main(["generate", "test-dep", "Hi", "--chat", "--max-new-tokens", "5"]) == 0
    chat = [{"role": "user", "content": "Hi"}]
    assert capsys.readouterr().out == expected_text(chat_text(chat), 5) + "\n"


def test_mii_help_is_fast_and_light():
    code = (
        "import sys, time; t = time.perf_counter(); sys.argv = ['mii', '--help']\n"
        "import mii.cli\n"
        "try: mii.cli.main()\n"
        "except SystemExit: pass\n"
        "heavy = {'torch', 'redis', 'pydantic', 'celery'} & set(sys.modules)\n"
        "print(sorted(heavy), time.perf_counter() - t, file=sys.stderr)"
    )
    best = None
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=30)  # fmt: skip
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        assert out.returncode == 0 and "serve" in out.stdout, out.stderr
        assert out.stderr.startswith("[]"), out.stderr
    assert best < 0.5, f"mii --help took {best:.2f}s"
