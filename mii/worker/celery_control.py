"""Remote control of mii workers through Celery's broadcast: `celery -A
mii.worker.celery_app control mii_pause` (stop taking work, finish what is in flight),
`mii_resume`, and `inspect mii_stats`. Celery's own `shutdown` drains and exits."""

from __future__ import annotations

from celery.worker.control import control_command, inspect_command


def _step(state):
    return getattr(state.consumer.controller, "mii_step", None)


@control_command()
def mii_pause(state):
    """Stop reading new requests; keep serving the ones in flight."""
    step = _step(state)
    if step is None or step.loop is None:
        return {"error": "this worker hosts no mii engine"}
    step.loop.pause()
    return {"ok": "paused", "in_flight": len(step.loop.active)}


@control_command()
def mii_resume(state):
    """Read new requests again."""
    step = _step(state)
    if step is None or step.loop is None:
        return {"error": "this worker hosts no mii engine"}
    step.loop.resume()
    return {"ok": "serving"}


@inspect_command()
def mii_stats(state):
    """Engine and loop statistics of this worker."""
    step = _step(state)
    return {"error": "this worker hosts no mii engine"} if step is None else step.statistics()
