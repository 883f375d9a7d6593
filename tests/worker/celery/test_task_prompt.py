"""How much of a prompt Flower shows: the first N characters of a task's args, none of them,
or all; set on `mii worker` (`--task-prompt-chars`, MII_TASK_PROMPT_CHARS), checked on the
task events a real worker sends."""

from __future__ import annotations

import io
import threading

import pytest
from serving import FAKE, fake_config

from mii.cli import build_parser
from mii.launch.serve import serve_deployment
from mii.launch.stages import Stages
from mii.worker.celery.events import preview

pytestmark = pytest.mark.timeout(90)


def test_preview_truncates_redacts_or_shows_all():
    text = "my secret prompt " * 10
    assert preview(text) == repr((text[:80] + "...",))
    assert preview(text, 6) == repr(("my sec...",))
    assert preview(text, 0) == "(<prompt of 170 characters, not shown>,)"
    assert preview(text, None) == repr((text,))
    assert preview([1, 2, 3], 0) == "(<3 token ids>,)"


def test_the_worker_option_and_its_variable(monkeypatch):
    parse = build_parser("worker").parse_args
    assert parse(["worker", "--deployment", "d"]).task_prompt_chars == "80"
    assert (
        parse(["worker", "--deployment", "d", "--task-prompt-chars", "None"]).task_prompt_chars
        == "none"
    )
    with pytest.raises(SystemExit):
        parse(["worker", "--deployment", "d", "--task-prompt-chars", "-1"])


@pytest.mark.redis
def test_a_redacting_worker_sends_no_prompt_text(worker_env, private_redis, monkeypatch):
    from celery import Celery

    monkeypatch.setenv("MII_TASK_PROMPT_CHARS", "0")  # the workers mii.serve starts inherit it
    config = fake_config("quiet", redis_url=private_redis.url)
    client = serve_deployment(config, engine_factory=FAKE, stages=Stages("quiet", io.StringIO()))
    app = Celery(broker=private_redis.url, set_as_current=False)
    seen: list[dict] = []
    try:
        with app.connection() as connection:
            receiver = app.events.Receiver(connection, handlers={"task-received": seen.append})
            threading.Thread(target=receiver.capture, kwargs={"wakeup": False},
                             daemon=True).start()  # fmt: skip
            for _ in range(20):  # events are not kept: send until the receiver listens
                client.generate("top secret words", max_new_tokens=2)
                if seen:
                    break
            receiver.should_stop = True
        assert seen and seen[0]["args"] == "(<prompt of 16 characters, not shown>,)"
        assert "secret" not in str(seen)
    finally:
        client.terminate_server()
        app.close()
