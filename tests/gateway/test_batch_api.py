"""OpenAI's Files and Batch APIs through a gateway process, on a real Redis with worker
processes running the fake engine: a round trip of 20 lines with the `openai` package, a
gateway killed (SIGKILL) and restarted while a batch is queued and run, and
`mii.serve(enable_restful_api=True)` starting a gateway that `terminate_server` stops."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time

import httpx
import openai
import pytest
from fake_engine import expected_text
from harness import wait_for
from redis_server import RedisServer

from mii.config import MIIConfig
from mii.launch.embedded_redis import free_port
from mii.launch.gateway import spawn_gateway
from mii.launch.serve import serve_deployment

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(120),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
FAKE = "fake_engine:make_fake_engine"
WORKER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "worker")


@pytest.fixture(scope="module")
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture
def worker_env(monkeypatch, tmp_path):
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([WORKER_DIR, os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MII_REDIS_URL", raising=False)


def _serve(name: str, url: str, **fields):
    config = MIIConfig(model_config={"model_name_or_path": "fake"}, deployment_name=name,
                       redis_url=url, **fields)  # fmt: skip
    return serve_deployment(config, engine_factory=FAKE)


def _lines(n: int, max_tokens: int = 6) -> bytes:
    body = lambda i: {"model": "fake", "prompt": f"line {i}", "max_tokens": max_tokens}  # noqa: E731
    rows = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": body(i)}
            for i in range(n)]  # fmt: skip
    return "\n".join(json.dumps(r) for r in rows).encode()


def _openai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=3)


def _finished(client: openai.OpenAI, batch_id: str, timeout_s: float = 60):
    def done():
        batch = client.batches.retrieve(batch_id)
        return batch if batch.status in ("completed", "cancelled", "failed") else None

    return wait_for(done, timeout_s=timeout_s, what="the batch to end")


def _check_output(client: openai.OpenAI, batch, n: int, max_tokens: int) -> None:
    assert batch.status == "completed"
    assert (batch.request_counts.total, batch.request_counts.completed) == (n, n)
    records = [
        json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()
    ]
    assert [r["custom_id"] for r in records] == [f"c{i}" for i in range(n)]
    for i, record in enumerate(records):
        body = record["response"]["body"]
        assert body["choices"][0]["text"] == expected_text(f"line {i}", max_tokens)
        assert body["usage"]["completion_tokens"] == max_tokens


def test_batch_round_trip_of_20_lines(worker_env, server):
    client = _serve("batch-dep", server.url)
    gateway = spawn_gateway("batch-dep", server.url, "127.0.0.1", free_port())
    try:
        api = _openai(gateway.url)
        uploaded = api.files.create(file=("in.jsonl", _lines(20)), purpose="batch")
        assert api.files.retrieve(uploaded.id).bytes == len(_lines(20))
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                   completion_window="24h", metadata={"run": "t"})  # fmt: skip
        assert batch.status in ("validating", "in_progress") and batch.metadata == {"run": "t"}
        done = _finished(api, batch.id)
        _check_output(api, done, 20, 6)
        assert done.error_file_id is None
        assert [b.id for b in api.batches.list(limit=5).data] == [batch.id]
        with pytest.raises(openai.NotFoundError):
            api.batches.retrieve("batch_nosuchthing")
    finally:
        gateway.stop()
        client.terminate_server(timeout_s=20)


def test_a_gateway_killed_while_a_batch_is_queued_loses_nothing(worker_env, server, monkeypatch):
    monkeypatch.setenv("MII_FAKE_STEP_DELAY", "0.01")
    # a bulk stream of 3 entries at most: queuing the lines takes a while
    client = _serve("restart-dep", server.url, broker={"max_bulk_depth": 3})
    port = free_port()
    gateway = spawn_gateway("restart-dep", server.url, "127.0.0.1", port)
    try:
        api = _openai(gateway.url)
        uploaded = api.files.create(file=("in.jsonl", _lines(20, 20)), purpose="batch")
        batch = api.batches.create(input_file_id=uploaded.id, endpoint="/v1/completions",
                                   completion_window="24h")  # fmt: skip
        time.sleep(0.3)
        os.kill(gateway.process.pid, signal.SIGKILL)
        gateway.process.wait(10)
        job = client.redis.hgetall(client.keys.job(batch.id).meta)
        submitted = int(job.get(b"submitted", 0))
        assert submitted < 20, "the kill came too late to test a resumed submission"
        gateway = spawn_gateway("restart-dep", server.url, "127.0.0.1", port)
        _check_output(api, _finished(api, batch.id), 20, 20)
    finally:
        gateway.stop()
        client.terminate_server(timeout_s=20)


def test_serve_with_restful_api_starts_a_gateway_that_terminate_stops(worker_env, server):
    port = free_port()
    client = _serve("rest-dep", server.url, enable_restful_api=True, restful_api_host="127.0.0.1",
                    restful_api_port=port)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        reply = httpx.post(f"{url}/mii/rest-dep", json={"prompts": "hi", "max_new_tokens": 3})
        assert reply.json()[0]["generated_text"] == expected_text("hi", 3)
        completion = _openai(url).completions.create(model="rest-dep", prompt="hi", max_tokens=3)
        assert completion.choices[0].text == expected_text("hi", 3)
    finally:
        client.terminate_server(timeout_s=20)
    assert client._owner.gateway.process.poll() is not None
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz")
