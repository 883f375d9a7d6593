"""Integration: bulk jobs on a private real Redis, served by two real worker processes
with the fast fake engine (which logs every request it starts), driven by
`scripts/bulk_generate.py` in subprocesses. The worker kill runs last."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
from bulk_engine import EXEC_LOG_ENV, chat_text, executions
from fake_engine import expected_text
from harness import wait_for
from redis_server import RedisServer

from mii.broker_config.keys import WORKER_GROUP
from mii.config import MIIConfig
from mii.launch.serve import serve_deployment
from mii.producer.bulk.jobs import BulkJobs

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAKES = os.path.join(TESTS, "worker")  # the fake engine the worker processes import
SCRIPT = os.path.join(os.path.dirname(TESTS), "scripts", "bulk_generate.py")
NAME = "bulk-itest"
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
BAD = {  # line -> (input line, what its error says)
    17: ('{"prompt": "unterminated', "not JSON"),
    123: ('{"prompt": "x", "params": {"temprature": 0.5}}', "temprature"),
    250: (json.dumps({"prompt": "long " * 60}), "no room to generate"),  # > max_length 256
    499: ("[1, 2, 3]", "JSON object"),
}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    server = RedisServer().start()
    log_dir = str(tmp_path_factory.mktemp("executions"))
    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join([FAKES, os.environ.get("PYTHONPATH", "")])
    os.environ.update({EXEC_LOG_ENV: log_dir, "MII_FAKE_STEP_DELAY": "0.01"})
    os.environ["MII_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "replica_num": 2, "max_length": 256},
        deployment_name=NAME,
        redis_url=server.url,
        # a bounded bulk stream: submitting 500 lines takes a while (room to kill it)
        broker={"reclaim_idle_s": 2.0, "heartbeat_interval_s": 0.5, "max_bulk_depth": 64},
    )
    client = serve_deployment(config, engine_factory="bulk_engine:make_counting_engine")
    yield client, server, log_dir
    client.terminate_server(timeout_s=20)
    os.environ.clear()
    os.environ.update(saved)
    server.stop()


def _input(tmp_path, n: int = 500, bad: bool = True) -> str:
    lines = [json.dumps({"prompt": f"line {i}", "id": f"q{i}"}) for i in range(n)]
    lines[321] = json.dumps({"messages": CHAT, "id": "q321"})
    for line, (text, _) in BAD.items() if bad else ():
        lines[line] = text
    path = tmp_path / "input.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run(server, path: str, *options: str, **popen) -> subprocess.Popen:
    cmd = [sys.executable, SCRIPT, NAME, path, "--output", path + ".out", "--redis-url", server.url]
    return subprocess.Popen([*cmd, *options], stdout=subprocess.PIPE, text=True, **popen)


def _check_output(path: str, new_tokens: int) -> list[dict]:
    with open(path + ".out") as f:
        records = [json.loads(line) for line in f]
    assert [r["line"] for r in records] == list(range(500))  # every line once, in order
    for i, record in enumerate(records):
        if i in BAD:
            assert BAD[i][1] in record["error"] and record["finish_reason"] == "error"
            continue
        prompt = chat_text(CHAT) if i == 321 else f"line {i}"
        assert record["id"] == f"q{i}" and "error" not in record
        assert record["text"] == expected_text(prompt, new_tokens), i
    return records


def _runs(log_dir: str, job_id: str, pid: str | None = None) -> Counter:
    """How often each line of a job was started (by the worker of that pid, if given)."""
    started = executions(log_dir, None if pid is None else f"{pid}.log")
    return Counter(rid for rid, _ in started if rid.startswith(job_id + "-"))


def test_a_500_line_job_comes_back_in_input_order_with_bad_lines_reported(deployment, tmp_path):
    client, server, log_dir = deployment
    path = _input(tmp_path)
    script = _run(server, path, "--max-new-tokens", "6", "--job", "five-hundred")
    out, _ = script.communicate(timeout=90)
    assert script.returncode == 0 and out.split()[0] == "five-hundred"
    _check_output(path, 6)
    runs = _runs(log_dir, "five-hundred")
    assert len(runs) == 500 - len(BAD) and max(runs.values()) == 1  # none ran twice
    status = BulkJobs(client).status("five-hundred")
    assert (status.done, status.errors, status.state.value) == (500, len(BAD), "done")


def test_a_killed_submitter_resubmitted_runs_every_line_exactly_once(deployment, tmp_path):
    client, server, log_dir = deployment
    path, bulk = _input(tmp_path), BulkJobs(client)
    first = _run(server, path, "--max-new-tokens", "16", "--job", "resumed")

    def queued() -> int:
        try:
            return bulk.status("resumed").submitted
        except Exception:  # not created yet
            return 0

    wait_for(lambda: queued() >= 100, timeout_s=30, what="the submitter under way")
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    assert queued() < 500  # it died mid-submit
    second = _run(server, path, "--max-new-tokens", "16", "--job", "resumed")
    assert second.wait(90) == 0
    _check_output(path, 16)
    runs = _runs(log_dir, "resumed")
    assert len(runs) == 500 - len(BAD) and set(runs.values()) == {1}  # none ran twice


def test_kill_9_of_a_worker_mid_job_loses_nothing(deployment, tmp_path):
    """Runs last: it leaves the deployment with one worker."""
    client, server, log_dir = deployment
    path, bulk = _input(tmp_path), BulkJobs(client)
    script = _run(server, path, "--max-new-tokens", "12", "--job", "survives")

    def victim_mid_generation():
        """A worker and lines it has published tokens of and not finished (it holds them)."""
        if _done(bulk, "survives") < 60:
            return None
        rows = client.redis.xpending_range(client.keys.bulk, WORKER_GROUP, "-", "+", 1000)
        for consumer in {row["consumer"].decode() for row in rows}:
            ids = [row["message_id"] for row in rows if row["consumer"].decode() == consumer]
            rids = {
                f[b"rid"].decode()
                for i in ids
                for _, f in client.redis.xrange(client.keys.bulk, i, i)
            }
            started = rids & set(_runs(log_dir, "survives", consumer.rsplit(":", 1)[1]))
            if started:
                return consumer, started
        return None

    victim, started = wait_for(victim_mid_generation, timeout_s=30, what="a worker mid-job")
    os.kill(int(victim.rsplit(":", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    assert script.wait(90) == 0
    assert time.monotonic() - killed_at < 60
    _check_output(path, 12)  # each line once, and taken-over lines whole and right
    runs = _runs(log_dir, "survives")
    assert len(runs) == 500 - len(BAD)
    twice = {rid for rid, n in runs.items() if n > 1}
    on_victim = set(_runs(log_dir, "survives", victim.rsplit(":", 1)[1]))
    assert twice and twice <= on_victim and max(runs.values()) == 2  # only the victim's lines
    # a bulk line publishes no tokens, so a taken-over line starts over (and is whole)
    assert all(n == 0 for rid, n in executions(log_dir) if rid in started)


def _done(bulk: BulkJobs, job_id: str) -> int:
    try:
        return bulk.status(job_id).done
    except Exception:
        return 0
