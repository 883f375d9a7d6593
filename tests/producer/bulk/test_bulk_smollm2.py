"""Integration: a bulk job in both input forms through `mii bulk` (subprocesses) and a real
worker process running SmolLM2 on the CPU, checked against `mii.pipeline` in this process:
prompts, a chat applied with the model's template by the worker, OpenAI batch lines."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from redis_server import RedisServer

import mii
from mii.producer.bulk.input import CHAT, COMPLETIONS

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
NAME = "bulk-smollm2"
MODEL = dict(num_kv_blocks=128, max_length=256)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Water boils at"]
MESSAGES = [{"role": "user", "content": "Name a primary colour."}]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """Greedy texts from `mii.pipeline`, the chat through the tokenizer's template."""
    pipe = mii.pipeline(smollm2_path, **MODEL)
    chat = pipe.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    texts = [r.generated_text for r in pipe([*PROMPTS, chat], **options)]
    pipe.destroy()
    return texts


@pytest.fixture(scope="module")
def server(smollm2_path, reference):
    srv = RedisServer().start()
    client = mii.serve(smollm2_path, deployment_name=NAME, redis_url=srv.url, **MODEL)
    yield srv
    client.terminate_server(timeout_s=30)
    srv.stop()


def _mii(server, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mii", "bulk", *args[:1], NAME, *args[1:]]
    out = subprocess.run(
        [*cmd, "--redis-url", server.url], capture_output=True, text=True, timeout=180
    )
    assert out.returncode == 0, out.stderr
    return out


def _openai(custom_id: str, url: str, body: dict) -> str:
    body = {"model": "smollm2", "max_tokens": NEW_TOKENS, "temperature": 0, **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def test_mii_and_openai_lines_match_the_pipeline(server, reference, tmp_path):
    lines = [json.dumps({"prompt": p, "id": f"p{i}"}) for i, p in enumerate(PROMPTS)]
    lines += [json.dumps({"messages": MESSAGES, "id": "chat"}), "not json"]
    mii_input = tmp_path / "mii.jsonl"
    mii_input.write_text("\n".join(lines) + "\n")
    out = _mii(server, "submit", str(mii_input), "--max-new-tokens", str(NEW_TOKENS), "--wait")
    job_id = out.stdout.split()[0]
    records = [json.loads(x) for x in _mii(server, "results", job_id).stdout.splitlines()]
    assert [r["id"] for r in records] == ["p0", "p1", "p2", "chat", "4"]
    assert [r.get("text") for r in records[:4]] == reference
    assert all(r["generated_tokens"] == NEW_TOKENS for r in records[:4])
    assert "not JSON" in records[4]["error"]
    status = json.loads(_mii(server, "status", job_id, "--json").stdout)
    assert (status["state"], status["done"], status["errors"]) == ("done", 5, 1)
    assert status["tokens"] == 4 * NEW_TOKENS

    batch = tmp_path / "openai.jsonl"
    batch.write_text(
        _openai("c0", COMPLETIONS, {"prompt": PROMPTS[0]})
        + "\n"
        + _openai("c1", CHAT, {"messages": MESSAGES})
        + "\n"
    )
    out = _mii(server, "submit", str(batch), "--output", str(tmp_path / "openai.out"), "--quiet")
    c0, c1 = [json.loads(x) for x in (tmp_path / "openai.out").read_text().splitlines()]
    assert c0["custom_id"] == "c0" and c0["response"]["status_code"] == 200
    assert c0["response"]["body"]["choices"][0]["text"] == reference[0]
    assert c0["response"]["body"]["usage"]["completion_tokens"] == NEW_TOKENS
    message = c1["response"]["body"]["choices"][0]["message"]
    assert message == {"role": "assistant", "content": reference[3]}
