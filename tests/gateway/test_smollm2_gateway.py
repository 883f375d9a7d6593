"""The gateway in front of a real SmolLM2 deployment (one CPU worker process, private real
Redis), served by uvicorn in this process: text parity with `client.generate`, streamed
chat against whole chat, n choices, real logprob alternatives, 64 concurrent streaming
clients, and a client that disconnects freeing its KV blocks."""

from __future__ import annotations

import asyncio
import json
import shutil

import httpx
import openai
import pytest
from gateway_server import ThreadedGateway
from harness import wait_for
from redis_server import RedisServer

import mii
from mii.broker_config.deployment import read_workers
from mii.gateway.app import create_app
from mii.gateway.settings import GatewaySettings
from mii.producer.submit import Chat

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
NAME = "gw-smollm2"
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
BROKER = dict(heartbeat_interval_s=0.5, reclaim_idle_s=3.0)


@pytest.fixture(scope="module")
def deployment(smollm2_path):
    srv = RedisServer().start()
    client = mii.serve(smollm2_path, deployment_name=NAME, redis_url=srv.url, broker=BROKER,
                       num_kv_blocks=512, max_length=512)  # fmt: skip
    yield client
    client.terminate_server(timeout_s=30)
    srv.stop()


@pytest.fixture(scope="module")
def gateway(deployment):
    settings = GatewaySettings(deployment=NAME, redis_url=deployment.redis_url)
    server = ThreadedGateway(create_app(settings)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def api(gateway):
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0)


def test_greedy_text_over_http_equals_the_clients(deployment, api):
    prompt = "The capital of France is"
    expected = deployment.generate(prompt, max_new_tokens=16, do_sample=False)[0]
    reply = api.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0)
    assert reply.choices[0].text == expected.generated_text
    assert reply.usage.prompt_tokens == expected.prompt_length
    assert reply.usage.completion_tokens == expected.generated_length
    chat = deployment.generate(Chat(CHAT), max_new_tokens=24, do_sample=False)[0]
    answer = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=24, temperature=0)
    assert answer.choices[0].message.content == chat.generated_text
    assert "Paris" in chat.generated_text


def test_streamed_chat_joins_to_the_whole_answer(api):
    whole = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=24, temperature=0)
    stream = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=24,
                                         temperature=0, stream=True)  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == whole.choices[0].message.content


def test_n_choices_and_logprobs_with_real_alternatives(api):
    three = api.completions.create(model=NAME, prompt="Once upon a time", max_tokens=8, n=3,
                                   temperature=1.0, seed=5)  # fmt: skip
    assert len(three.choices) == 3 and len({c.text for c in three.choices}) > 1
    reply = api.chat.completions.create(model=NAME, messages=CHAT, max_tokens=6, temperature=0,
                                        logprobs=True, top_logprobs=3)  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    for token in content:
        assert len(token.top_logprobs) == 3 and token.logprob <= 0
        assert token.top_logprobs[0].logprob == pytest.approx(token.logprob, abs=1e-4)  # greedy
    completion = api.completions.create(model=NAME, prompt="2 + 2 =", max_tokens=3,
                                        temperature=0, logprobs=2)  # fmt: skip
    assert len(completion.choices[0].logprobs.top_logprobs[0]) == 2


def test_64_concurrent_streaming_clients_all_complete(gateway):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        prompt = f"Question {i}: {i} + {i} ="
        stream = await client.completions.create(
            model=NAME, prompt=prompt, max_tokens=6, temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def all_of_them():
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0,
                                    http_client=httpx.AsyncClient(limits=httpx.Limits(
                                        max_connections=64), timeout=120))  # fmt: skip
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(all_of_them())
    assert len(results) == 64
    assert all(text and reason in ("stop", "length") for text, reason in results)


def _kv_free(deployment) -> list[tuple[int, int]]:
    workers = read_workers(deployment.redis, deployment.keys).values()
    return [(w["engine"]["kv_blocks_free"], w["engine"]["kv_blocks_total"]) for w in workers]


def test_a_client_that_disconnects_frees_its_kv_blocks(deployment, gateway):
    body = {"model": NAME, "prompt": "Tell me a very long story.", "max_tokens": 400,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as reply:
        events = (line for line in reply.iter_lines() if line.startswith("data:"))
        for _ in range(3):
            assert json.loads(next(events)[5:])["choices"][0]["text"] is not None
        wait_for(lambda: any(f < t for f, t in _kv_free(deployment)), timeout_s=10,
                 what="blocks in use")  # fmt: skip
    wait_for(lambda: all(f == t for f, t in _kv_free(deployment)), timeout_s=15,
             what="blocks freed after the disconnect")  # fmt: skip
