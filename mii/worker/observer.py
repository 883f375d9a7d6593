"""Hooks the worker loop calls along each request's life (Celery task events, metrics).

The loop calls them on its own thread; an observer must be quick and must not raise (the
loop logs and ignores what one raises).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class RequestObserver:
    """The no-op observer; subclasses override what they need."""

    def received(self, rid: str, prompt: Any, params: dict[str, Any]) -> None:
        """Read from a request stream (new, reclaimed or handed back)."""

    def started(self, rid: str) -> None:
        """Admitted into the engine."""

    def finished(
        self, rid: str, reason: str, prompt_tokens: int, tokens: int, error: str | None = None
    ) -> None:
        """Ended: finished, cancelled, timed out, or refused (`error` set)."""


def notify(observer: RequestObserver, event: str, *args, **kwargs) -> None:
    """Call one hook; an observer's failure never reaches the engine loop."""
    try:
        getattr(observer, event)(*args, **kwargs)
    except Exception:  # noqa: BLE001 (observers are best effort by contract)
        log.exception("request observer failed in %s", event)
