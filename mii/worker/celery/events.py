"""Each generation request as a Celery task named `mii.generate`, in Celery's event stream.

Requests reach workers through Redis streams, not as Celery messages, so the worker sends
the task events itself: task-received when it reads a request, task-started when the
engine admits it, task-succeeded (with a short result) or task-failed when it ends.
Flower builds its tasks page from exactly these events.

A task's args show the start of its prompt: `prompt_chars` characters (80 by default; `mii
worker --task-prompt-chars N`), 0 for none (only its length), None for all of it. Anyone
who can read the Celery events (Flower's users) reads what is shown.
"""

from __future__ import annotations

import json
import time
from typing import Any

from mii.worker.observer import RequestObserver

TASK_NAME = "mii.generate"
PREVIEW = 80  # characters of a prompt shown as the task's args, by default


def preview(prompt: Any, chars: int | None = PREVIEW) -> str:
    """The task's args for a prompt: its first `chars` characters (None: all, 0: none)."""
    if not isinstance(prompt, str):
        return f"(<{len(prompt)} token ids>,)"
    if chars == 0:
        return f"(<prompt of {len(prompt)} characters, not shown>,)"
    text = prompt if chars is None or len(prompt) <= chars else prompt[:chars] + "..."
    return repr((text,))


class TaskEvents(RequestObserver):
    def __init__(self, app, hostname: str, prompt_chars: int | None = PREVIEW) -> None:
        self.hostname, self.prompt_chars = hostname, prompt_chars
        self.connection = app.connection_for_write()
        self.dispatcher = app.events.Dispatcher(
            connection=self.connection, hostname=hostname, enabled=True
        )
        self.started_at: dict[str, float] = {}
        self.received_ids: set[str] = set()

    def _send(self, kind: str, rid: str, **fields) -> None:
        self.dispatcher.send(f"task-{kind}", uuid=rid, **fields)

    def received(self, rid: str, prompt: Any, params: dict[str, Any]) -> None:
        self.received_ids.add(rid)
        self._send(
            "received", rid, name=TASK_NAME, args=preview(prompt, self.prompt_chars),
            kwargs=json.dumps(params, default=str), retries=0, eta=None, expires=None,
            root_id=rid, parent_id=None,
        )  # fmt: skip

    def started(self, rid: str) -> None:
        self.started_at[rid] = time.monotonic()
        self._send("started", rid)

    def finished(
        self, rid: str, reason: str, prompt_tokens: int, tokens: int, error: str | None = None
    ) -> None:
        runtime = time.monotonic() - self.started_at.pop(rid, time.monotonic())
        if rid not in self.received_ids:  # refused before it could be read: name it anyway
            self.received(rid, "", {})
        self.received_ids.discard(rid)
        if error is not None:
            self._send("failed", rid, exception=error, traceback="", runtime=runtime)
            return
        result = {"finish_reason": reason, "prompt_tokens": prompt_tokens, "tokens": tokens}
        self._send("succeeded", rid, result=json.dumps(result), runtime=runtime)

    def close(self) -> None:
        self.dispatcher.close()
        self.connection.release()
