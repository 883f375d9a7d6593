"""Integration: `mii.serve` with real worker processes running SmolLM2 on the CPU, on a
private real Redis. One deployment (two replicas) serves the whole module; the tests that
break things run last (Redis restart, then kill -9 of a worker)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
import time

import pytest
from harness import read_chunks, wait_for
from redis_server import RedisServer

import mii
from mii.broker_config import wire
from mii.broker_config.deployment import read_workers
from mii.broker_config.keys import WORKER_GROUP
from mii.constants import GenerationFinishReason as Reason
from mii.errors import GenerationError, InvalidRequestError
from mii.params import GenerateParams
from mii.producer.request_set import RequestSet

pytestmark = [
    pytest.mark.redis,
    pytest.mark.slow,
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

NAME = "itest-smollm2"
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, there was",
    "The three primary colors are",
    "Water boils at",
    "My favourite programming language is",
]
GREEDY = dict(max_new_tokens=32, do_sample=False, ignore_eos=True)
MODEL = dict(num_kv_blocks=256, max_length=512)
BROKER = dict(reclaim_idle_s=3.0, heartbeat_interval_s=0.5, admit_batch=2, drain_timeout_s=10)


@pytest.fixture(scope="module")
def server():
    srv = RedisServer().start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """The uninterrupted greedy text of every prompt, from `mii.pipeline` in this process."""
    pipe = mii.pipeline(smollm2_path, **MODEL)
    texts = {p: r.generated_text for p, r in zip(PROMPTS, pipe(PROMPTS, **GREEDY), strict=True)}
    pipe.destroy()
    return texts


@pytest.fixture(scope="module")
def client(server, smollm2_path, reference):
    client = mii.serve(
        smollm2_path,
        deployment_name=NAME,
        replica_num=2,
        redis_url=server.url,
        broker=BROKER,
        **MODEL,
    )
    yield client
    client.terminate_server(timeout_s=30)


def _inspecting_client(server):
    return mii.client(NAME, redis_url=server.url, delete_responses=False)


def _chunks(client, rid):
    return read_chunks(client.redis, client.keys, rid)


def _indices(chunks):
    return [i for c in chunks for i in range(c.i, c.i + len(c.ids))]


def test_blocking_streaming_async_and_pipeline_agree(client, reference):
    prompts = PROMPTS[:2]
    blocking = [r.generated_text for r in client.generate(prompts, **GREEDY)]
    streamed = ["".join(d.generated_text for d in client.stream(p, **GREEDY)) for p in prompts]
    asynced = [r.generated_text for r in asyncio.run(client.agenerate(prompts, **GREEDY))]
    expected = [reference[p] for p in prompts]
    assert blocking == expected and streamed == expected and asynced == expected


def test_sixteen_concurrent_clients(client, server):
    results: dict[int, object] = {}

    def ask(i: int) -> None:
        try:
            own = mii.client(NAME, redis_url=server.url)
            prompt = f"Question {i}: what is {i} plus {i}?"
            results[i] = own.generate(prompt, max_new_tokens=8)[0]
        except Exception as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert sorted(results) == list(range(16))
    errors = [r for r in results.values() if isinstance(r, Exception)]
    assert not errors, errors[0]
    for response in results.values():
        assert response.finish_reason in (Reason.STOP, Reason.LENGTH)
        assert response.generated_length == len(response.token_ids) > 0


def test_both_replicas_take_work(client, server):
    inspect = _inspecting_client(server)
    requests = inspect.submit(PROMPTS, **GREEDY)
    requests.wait()
    finals = [_chunks(inspect, r.rid)[-1] for r in requests.requests]
    assert len({f.worker for f in finals}) == 2
    assert {w for w in read_workers(client.redis, client.keys)} == {f.worker for f in finals}


def test_bad_params_refused_at_client_and_at_worker(client):
    with pytest.raises(InvalidRequestError, match="top_p"):
        client.generate("hi", top_p=5)
    forged = wire.RequestMessage(rid="forged-bad-params", prompt="hi", params={"top_k": -3},
                                 reply="forged")  # fmt: skip
    client.redis.xadd(client.keys.requests, wire.request_fields(forged))
    with pytest.raises(InvalidRequestError, match="top_k"):
        for _ in client._follow(RequestSet(client.keys, [forged], GenerateParams(), "forged")):
            pass
    with pytest.raises(InvalidRequestError, match="no room to generate"):
        client.generate("word " * 600, max_new_tokens=4)
    assert client.generate("Still serving?", **GREEDY)[0].generated_length == 32


def test_poison_request_reaches_the_dead_letter_stream(client):
    """A request whose three holders died: the next worker dead-letters it."""
    message = wire.RequestMessage(rid="poison-1", prompt="poison", params={"max_new_tokens": 2},
                                  reply="poisoned")  # fmt: skip
    stream = client.keys.requests
    pipe = client.redis.pipeline(transaction=True)  # live workers only see it after EXEC
    pipe.xadd(stream, wire.request_fields(message), id="*")
    pipe.xreadgroup(WORKER_GROUP, "deadhost:1", {stream: ">"}, count=1)
    entry_id = pipe.execute()[0]
    for n in (2, 3):
        client.redis.xclaim(stream, WORKER_GROUP, f"deadhost:{n}", 0, [entry_id])
    with pytest.raises(GenerationError, match="dead-lettered"):
        for _ in client._follow(RequestSet(client.keys, [message], GenerateParams(), "poisoned")):
            pass
    letters = client.redis.xrange(client.keys.deadletter)
    assert any(fields[b"rid"] == b"poison-1" for _, fields in letters)


def _kv_free(client) -> dict[str, tuple[int, int]]:
    workers = read_workers(client.redis, client.keys).values()
    return {
        w["pid"]: (w["engine"]["kv_blocks_free"], w["engine"]["kv_blocks_total"]) for w in workers
    }


def test_cancel_frees_kv_blocks(client):
    requests = client.submit(["Tell me a very long story."], max_new_tokens=400, ignore_eos=True)
    rid = requests.requests[0].rid
    wait_for(lambda: len(_chunks(client, rid)) >= 3, timeout_s=60, what="tokens")
    wait_for(  # worker statuses refresh every heartbeat
        lambda: any(free < total for free, total in _kv_free(client).values()),
        timeout_s=10,
        what="blocks in use",
    )
    client.cancel(rid)
    requests.wait()
    assert requests.responses()[0].finish_reason == Reason.CANCELLED
    wait_for(
        lambda: all(free == total for free, total in _kv_free(client).values()),
        timeout_s=10,
        what="blocks freed",
    )


def test_redis_restart_mid_run(client, server, reference):
    inspect = _inspecting_client(server)
    prompts = PROMPTS[2:6]
    requests = inspect.submit(prompts, **GREEDY)
    first = requests.requests[0].rid
    wait_for(lambda: len(_chunks(inspect, first)) >= 2, timeout_s=60, what="tokens")
    server.restart(down_s=1.0)
    requests.wait()
    assert [r.generated_text for r in requests.responses()] == [reference[p] for p in prompts]
    for request in requests.requests:
        # a reply lost in the restart may make a worker write a chunk twice; no gaps
        indices = _indices(_chunks(inspect, request.rid))
        assert sorted(set(indices)) == list(range(GREEDY["max_new_tokens"]))


def test_kill_9_of_a_worker_mid_generation(client, server, reference):
    """Runs last: it leaves the deployment with one replica."""
    inspect = _inspecting_client(server)
    requests = inspect.submit(PROMPTS, **GREEDY)
    rids = [r.rid for r in requests.requests]

    def victim():
        rows = client.redis.xpending_range(client.keys.requests, WORKER_GROUP, "-", "+", 100)
        started = {r for r in rids if 2 <= len(_chunks(inspect, r)) < 30}
        holders = [row["consumer"].decode() for row in rows]
        return holders[0] if holders and started else None

    consumer = wait_for(victim, timeout_s=60, what="a worker mid-generation")
    os.kill(int(consumer.rsplit(":", 1)[1]), signal.SIGKILL)
    killed_at = time.monotonic()
    requests.wait()
    assert time.monotonic() - killed_at < 60
    n = GREEDY["max_new_tokens"]
    for prompt, request in zip(PROMPTS, requests.requests, strict=True):
        response = request.assembler.response()
        assert response.generated_length == n
        assert _indices(_chunks(inspect, request.rid)) == list(range(n))  # each index once
        assert response.generated_text == reference[prompt]
    survivors = wait_for(
        lambda: [
            w
            for name, w in read_workers(client.redis, client.keys).items()
            if name != consumer and w.get("stats", {}).get("resumed", 0) > 0
        ],
        timeout_s=10,
        what="the survivor's report",
    )
    assert survivors[0]["stats"]["reclaimed"] >= 1
