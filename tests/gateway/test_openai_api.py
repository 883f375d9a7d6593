"""The gateway over the fakeredis harness (a real WorkerLoop with the fake engine), served by
uvicorn on a loopback port, driven by the official `openai` package and plain httpx."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from bulk_engine import CountingEngine, chat_text
from fake_engine import FakeEngine, expected_text
from harness import wait_for

pytestmark = pytest.mark.timeout(60)
CHAT = [{"role": "user", "content": "Hello"}]


def _openai(gateway, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="none", max_retries=0, **kwargs)


def test_completion_whole_and_streamed(harness, gateway_for):
    harness.start()
    client = _openai(gateway_for())
    whole = client.completions.create(model="test-dep", prompt="abc", max_tokens=5)
    assert whole.choices[0].text == expected_text("abc", 5)
    assert whole.choices[0].finish_reason == "length"
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (3, 5)
    usage = {"include_usage": True}
    stream = client.completions.create(
        model="test-dep", prompt="abc", max_tokens=5, stream=True, stream_options=usage
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 8


def test_chat_streamed_deltas_join_to_the_whole_answer_async(harness, gateway_for):
    harness.start(CountingEngine())
    gateway = gateway_for()

    async def ask():
        client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="none")
        whole = await client.chat.completions.create(model="fake", messages=CHAT, max_tokens=6)
        stream = await client.chat.completions.create(model="fake", messages=CHAT, max_tokens=6,
                                                      stream=True)  # fmt: skip
        deltas = [chunk async for chunk in stream]
        return whole, deltas

    whole, deltas = asyncio.run(ask())
    assert whole.choices[0].message.content == expected_text(chat_text(CHAT), 6)
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == expected_text(
        chat_text(CHAT), 6
    )
    assert deltas[0].choices[0].delta.role == "assistant"
    assert deltas[-1].choices[0].finish_reason == "length"


def test_n_gives_n_choices_and_prompt_lists_n_each(harness, gateway_for):
    harness.start()
    client = _openai(gateway_for())
    three = client.completions.create(model="test-dep", prompt="q", max_tokens=3, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    both = client.completions.create(model="test-dep", prompt=["a", "bb"], max_tokens=2, n=2)
    texts = [c.text for c in both.choices]
    assert texts == [expected_text("a", 2)] * 2 + [expected_text("bb", 2)] * 2
    assert both.usage.prompt_tokens == 3 and both.usage.completion_tokens == 8


def test_echo_puts_the_prompt_first(harness, gateway_for):
    harness.start()
    client = _openai(gateway_for())
    reply = client.completions.create(model="test-dep", prompt="xy", max_tokens=2, echo=True)
    assert reply.choices[0].text == "xy" + expected_text("xy", 2)
    streamed = client.completions.create(model="test-dep", prompt="xy", max_tokens=2,
                                         echo=True, stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == reply.choices[0].text


def _error(reply: httpx.Response) -> dict:
    return reply.json()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "temperature": 5}, "temperature"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ],
)
def test_bad_parameters_are_400_naming_them(harness, gateway_for, body, param):
    harness.start()
    reply = httpx.post(f"{gateway_for().url}/v1/completions", json=body)
    assert reply.status_code == 400
    assert _error(reply)["param"] == param and _error(reply)["type"] == "invalid_request_error"


def test_unknown_model_is_404_and_no_worker_503(harness, gateway_for):
    gateway = gateway_for()
    with pytest.raises(openai.NotFoundError):
        _openai(gateway).completions.create(model="gpt-9", prompt="x")
    with pytest.raises(openai.APIStatusError) as info:
        _openai(gateway).completions.create(model="test-dep", prompt="x")
    assert info.value.status_code == 503  # no worker yet: nothing would serve it
    assert info.value.body["code"] == "no_live_worker"
    harness.start()
    wait_for(lambda: httpx.get(f"{gateway.url}/health").status_code == 200, what="healthy")
    with pytest.raises(openai.NotFoundError) as info:
        _openai(gateway).completions.create(model="gpt-9", prompt="x")
    assert info.value.body["code"] == "model_not_found"


def test_body_over_the_limit_is_413(harness, gateway_for):
    harness.start()
    url = f"{gateway_for(max_body_bytes=1000).url}/v1/completions"
    reply = httpx.post(url, json={"prompt": "x" * 2000})
    assert reply.status_code == 413 and _error(reply)["code"] == "request_too_large"

    def chunked():  # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        yield b"y" * 2000
        yield b'"}'

    assert httpx.post(url, content=chunked()).status_code == 413


def test_full_queue_is_429_with_retry_after(gateway_for):
    from harness import Harness

    crowded = Harness(deployment="full-dep", max_queue_depth=1)
    try:
        crowded.start().pause()  # alive, reads nothing
        crowded.client().submit(["waiting"])
        from mii.gateway.app import create_app
        from mii.gateway.settings import GatewaySettings

        app = create_app(GatewaySettings(deployment="full-dep", retry_after_s=3),
                         client=crowded.client())  # fmt: skip
        from gateway_server import ThreadedGateway

        gateway = ThreadedGateway(app).start()
        try:
            reply = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x"})
        finally:
            gateway.stop()
    finally:
        crowded.stop()
    assert reply.status_code == 429 and reply.headers["retry-after"] == "3"
    assert _error(reply)["type"] == "rate_limit_error"


def test_deadline_is_504(harness, gateway_for):
    harness.start(FakeEngine(step_delay_s=0.05))
    gateway = gateway_for(request_timeout_s=0.3)
    reply = httpx.post(f"{gateway.url}/v1/completions", json={"prompt": "x", "max_tokens": 500},
                       timeout=20)  # fmt: skip
    assert reply.status_code == 504 and _error(reply)["code"] == "request_timeout"


def test_api_keys_are_enforced_on_the_api_only(harness, gateway_for):
    harness.start()
    gateway = gateway_for(api_keys=("k-one", "k-two"))
    for key in (None, "wrong"):
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        reply = httpx.get(f"{gateway.url}/v1/models", headers=headers)
        assert reply.status_code == 401 and _error(reply)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="k-two", max_retries=0)
    assert client.models.list().data[0].id == "test-dep"
    assert httpx.get(f"{gateway.url}/health").status_code == 200


def test_health_metrics_and_mii_route(harness, gateway_for):
    gateway = gateway_for()
    assert httpx.get(f"{gateway.url}/health").status_code == 503
    assert httpx.get(f"{gateway.url}/healthz").text == "ok"
    harness.start()
    wait_for(lambda: httpx.get(f"{gateway.url}/health").status_code == 200, what="healthy")
    reply = httpx.post(f"{gateway.url}/mii/test-dep",
                       json={"prompts": ["hi", "yo"], "max_new_tokens": 3})  # fmt: skip
    assert [r["generated_text"] for r in reply.json()] == [
        expected_text(p, 3) for p in ("hi", "yo")
    ]
    assert reply.json()[0]["finish_reason"] == "length"
    assert httpx.post(f"{gateway.url}/mii/other", json={"prompts": "x"}).status_code == 404
    text = httpx.get(f"{gateway.url}/metrics").text
    assert 'mii_gateway_requests_total{route="/mii/{deployment:path}",status="200"} 1.0' in text
    assert 'mii_gateway_queue_depth{stream="requests"}' in text
    assert "mii_gateway_generation_tokens_total 6.0" in text


def test_a_client_that_disconnects_mid_stream_cancels_its_request(harness, gateway_for):
    engine = FakeEngine(step_delay_s=0.02)
    harness.start(engine)
    gateway = gateway_for()
    body = {"prompt": "long", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body) as reply:
        lines = reply.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        assert first["choices"][0]["text"]
    wait_for(lambda: engine.aborted, timeout_s=10, what="the request cancelled")
    assert not engine.requests


def test_a_client_that_hangs_up_on_a_whole_answer_cancels_it(harness, gateway_for):
    engine = FakeEngine(step_delay_s=0.02)
    harness.start(engine)
    gateway = gateway_for()
    body = {"prompt": "long", "max_tokens": 2000}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{gateway.url}/v1/completions", json=body, timeout=0.5)
    wait_for(lambda: engine.aborted, timeout_s=10, what="the request cancelled")
    assert not engine.requests
