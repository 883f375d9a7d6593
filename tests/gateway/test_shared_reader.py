"""The gateway's streams share one reader per process: a client that hangs up (its handler
cancelled) neither stops the reader nor the other streams, and many concurrent streams
all complete with their own text."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from fake_engine import FakeEngine, expected_text
from harness import wait_for

pytestmark = pytest.mark.timeout(60)


def _stream_text(url: str, prompt: str, max_tokens: int) -> str:
    body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
        for line in reply.iter_lines():
            if line.startswith("data: {"):
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def test_a_client_hanging_up_leaves_the_other_streams_running(harness, gateway_for):
    engine = FakeEngine(step_delay_s=0.01)
    harness.start(engine)
    gateway = gateway_for()
    body = {"prompt": "first and gone", "max_tokens": 2000, "stream": True}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body) as reply:
        lines = reply.iter_lines()  # this request started the process's reader
        assert json.loads(next(line for line in lines if line.startswith("data:"))[5:])
        result: list[str] = []
        other = threading.Thread(
            target=lambda: result.append(_stream_text(gateway.url, "stays", 40)), daemon=True
        )
        other.start()
        wait_for(lambda: len(engine.requests) == 2, what="the second request running")
    wait_for(lambda: engine.aborted, timeout_s=10, what="the first request cancelled")
    other.join(30)
    assert result == [expected_text("stays", 40)]


def test_32_concurrent_streams_each_get_their_own_text(harness, gateway_for):
    harness.start(FakeEngine(step_delay_s=0.005))
    gateway = gateway_for()

    async def one(http: httpx.AsyncClient, prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 24, "stream": True}
        text = []
        async with http.stream("POST", "/v1/completions", json=body) as reply:
            async for line in reply.aiter_lines():
                if line.startswith("data: {"):
                    text += [c["text"] for c in json.loads(line[6:])["choices"]]
        return "".join(text)

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
            return await asyncio.gather(*(one(http, f"stream {i}") for i in range(32)))

    texts = asyncio.run(main())
    assert texts == [expected_text(f"stream {i}", 24) for i in range(32)]
