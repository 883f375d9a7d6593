"""What a client refuses before anything is queued (issue 12, items 3 and 7): every bad
input is one `InvalidRequestError` naming what is wrong, in the blocking and the asyncio
client alike, and the request stream stays empty."""

from __future__ import annotations

import asyncio

import pytest
from fake_engine import FakeEngine, expected_text
from harness import Harness

from mii.broker_config import wire
from mii.config import MIIConfig
from mii.errors import InvalidRequestError
from mii.producer.client import Client

pytestmark = pytest.mark.timeout(30)

BAD_CALLS = [
    # (prompts, options, what the message names)
    ("hi", {"max_new_tokens": 10**30}, "max_new_tokens"),
    ([1, 2**70], {}, "token id"),
    ("hi", {"stop_token_ids": [2**70]}, "stop_token_ids"),
    ("abc\udcff", {}, "not valid Unicode"),
    ("hi", {"stop": "abc\udcff"}, "stop"),
    ("hi", {"timeout": "abc"}, "timeout"),
    ("hi", {"timeout": float("nan")}, "timeout"),
    ("hi", {"timeout": float("inf")}, "timeout"),
    ("hi", {"timeout": 0}, "timeout"),
    ("hi", {"timeout": -1}, "timeout"),
    ("hi", {"timeout": True}, "timeout"),
    ("hi", {"max_new_tokens": "10"}, "max_new_tokens"),
    ("hi", {"do_sample": "yes"}, "do_sample"),
    ("hi", {"temperature": float("inf")}, "temperature"),
    ("hi", {"top_p": float("nan")}, "top_p"),
    (None, {}, "a prompt is a string or a list of token ids"),
    (123, {}, "a prompt is a string or a list of token ids"),
    (b"hi", {}, "decode bytes to str"),
    (["ok", b"hi"], {}, r"prompts\[1\]"),
]


@pytest.mark.parametrize(("prompts", "options", "names"), BAD_CALLS)
def test_bad_input_is_one_clear_error_and_nothing_is_queued(harness, prompts, options, names):
    client = harness.client()
    with pytest.raises(InvalidRequestError, match=names):
        client.generate(prompts, **options)
    with pytest.raises(InvalidRequestError, match=names):
        list(client.stream(prompts, **options))

    async def agenerate():
        with pytest.raises(InvalidRequestError, match=names):
            await client.agenerate(prompts, **options)

    asyncio.run(agenerate())
    assert harness.redis.xlen(harness.keys.requests) == 0


def test_temperature_zero_is_greedy_whatever_do_sample_says(harness):
    engine, seen = FakeEngine(), []
    add = engine.add_request
    engine.add_request = lambda rid, ids, params, *a: (seen.append(params), add(rid, ids, params))
    harness.start(engine)
    client = harness.client()
    for do_sample in (True, False):
        (response,) = client.generate("cold", temperature=0, do_sample=do_sample, max_new_tokens=3)
        assert response.generated_text == expected_text("cold", 3)
    assert [p.temperature for p in seen] == [0.0, 0.0]


def test_greedy_requests_carry_no_seed(harness):
    client = harness.client()
    client.submit(["a"], temperature=0)
    client.submit(["b"])
    entries = harness.redis.xrange(harness.keys.requests)
    params = [wire.decode_request(fields).params for _, fields in entries]
    assert "seed" not in params[0] and "seed" in params[1]


def _client(harness: Harness, max_length: int | None = None, **broker) -> Client:
    config = MIIConfig(
        model_config={"model_name_or_path": "fake", "max_length": max_length},
        deployment_name=harness.keys.deployment,
        broker={**harness.settings.model_dump(), **broker},
    )
    return Client(config, redis_client=harness.connection())


def test_prompt_byte_limit_is_checked_before_queueing(harness):
    client = _client(harness)  # no max_length: the 1 MiB floor
    assert client.max_request_bytes == 1 << 20
    with pytest.raises(InvalidRequestError, match=r"1,048,577 bytes.*1,048,576 bytes.*max_request"):
        client.generate("x" * ((1 << 20) + 1))
    with pytest.raises(InvalidRequestError, match=r"prompts\[1\].*4,194,304 bytes"):
        client.generate(["fine", [7] * (1 << 20)])
    assert harness.redis.xlen(harness.keys.requests) == 0
    client.submit(["é" * (1 << 19)])  # 2 bytes a character: exactly at the limit
    assert harness.redis.xlen(harness.keys.requests) == 1


def test_prompt_byte_limit_follows_max_length_and_the_setting(harness):
    assert _client(harness, max_length=65536).max_request_bytes == 32 * 65536
    client = _client(harness, max_length=65536, max_request_bytes=100)
    with pytest.raises(InvalidRequestError, match="101 bytes, over this deployment's limit of 100"):
        client.generate("y" * 101)
    with pytest.raises(InvalidRequestError, match="104 bytes"):
        client.generate(list(range(26)))
    assert harness.redis.xlen(harness.keys.requests) == 0
