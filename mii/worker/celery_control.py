"""Remote control of mii workers through Celery's broadcast: `celery -A
mii.worker.celery_app control mii_pause` (stop taking work, finish what is in flight),
`mii_resume`, and `inspect mii_stats`. Celery's own `shutdown` drains and exits."""

from __future__ import annotations

from celery.worker.control import control_command, inspect_command

NOT_HOSTING = {"error": "this worker hosts no mii engine"}


def _loop(state):
    step = getattr(state.consumer.controller, "mii_step", None)
    return None if step is None else step.loop


@control_command()
def mii_pause(state):
    """Stop reading new requests; keep serving the ones in flight."""
    loop = _loop(state)
    if loop is None:
        return NOT_HOSTING
    loop.pause()
    return {"ok": "paused", "in_flight": len(loop.active)}


@control_command()
def mii_resume(state):
    """Read new requests again."""
    loop = _loop(state)
    if loop is None:
        return NOT_HOSTING
    loop.resume()
    return {"ok": "serving"}


@inspect_command()
def mii_stats(state):
    """Engine and loop statistics of this worker."""
    step = getattr(state.consumer.controller, "mii_step", None)
    return NOT_HOSTING if step is None else step.statistics()
