"""`mii control pause|resume DEP` against real Celery workers (`mii worker` processes that
mii.serve started, the fake engine): a paused deployment leaves a new request queued, a
resumed one serves it; only that deployment's workers answer."""

from __future__ import annotations

import io
import time

import pytest
from fake_engine import expected_text
from serving import FAKE, fake_config

from mii.broker_config.keys import WORKER_GROUP
from mii.cli import main
from mii.launch.serve import serve_deployment
from mii.launch.stages import Stages
from mii.worker.celery.control import node_pattern

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]


def test_node_pattern_matches_that_deployment_only():
    import re

    pattern = re.compile(node_pattern("a.b"))
    assert pattern.match("mii-a_b-0@host") and pattern.match("mii-a_b-12@h.example")
    assert not pattern.match("mii-a_b-x-0@host") and not pattern.match("mii-a-0@host")


def test_pause_then_resume(worker_env, private_redis, capsys):
    url = private_redis.url
    served = [
        serve_deployment(
            fake_config(name, redis_url=url),
            engine_factory=FAKE,
            stages=Stages(name, io.StringIO()),
        )  # fmt: skip
        for name in ("ctl", "other")
    ]
    client = served[0]
    try:
        assert main(["control", "pause", "ctl", "--redis-url", url]) == 0
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith("mii-ctl-0@") and ": paused (0 request" in out[0]
        generation = client.submit("hello", max_new_tokens=4, do_sample=False)
        time.sleep(1.5)  # a serving worker takes a request within block_ms
        pending = client.redis.xpending(client.keys.requests, WORKER_GROUP)["pending"]
        assert client.redis.xlen(client.keys.requests) == 1 and pending == 0
        assert served[1].generate("still serving", max_new_tokens=2)  # the other deployment
        assert main(["control", "resume", "ctl", "--redis-url", url]) == 0
        assert ": serving" in capsys.readouterr().out
        (response,) = generation.wait()
        assert response.generated_text == expected_text("hello", 4)
    finally:
        for each in served:
            each.terminate_server()


def test_no_worker_answering_is_one_line(private_redis, capsys):
    assert main(["control", "pause", "nobody", "--redis-url", private_redis.url,
                 "--timeout", "0.5"]) == 1  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("mii control: no worker of 'nobody' answered within 0.5s")
    assert len(err.strip().splitlines()) == 1
