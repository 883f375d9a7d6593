"""The Celery app whose workers host mii's engine loop: `celery -A mii.worker.celery.app worker`
(or `mii worker`, which wraps it).

Generation requests do not travel as Celery messages: they come through the deployment's
Redis streams, which a bootstep's engine loop reads. Celery supplies what an operator of a
fleet expects: workers and every request visible in Flower (task events of `mii.generate`),
engine statistics in `celery inspect stats`, remote control (`mii_pause`, `mii_resume`,
`shutdown`), and its worker lifecycle (SIGTERM drains). JSON only on the wire, never pickle.

Remote control: `celery -A mii.worker.celery.app control mii_pause` (stop taking work, finish
what is in flight), `mii_resume`, and `inspect mii_stats`; Celery's own `shutdown` drains.
"""

from __future__ import annotations

import os

from celery import Celery
from celery.worker.control import control_command, inspect_command
from click import Option

from mii.broker_config.settings import DEFAULT_REDIS_URL, REDIS_URL_ENV, celery_broker_url
from mii.worker.celery.bootstep import EngineLoopStep


def make_app(redis_url: str | None = None) -> Celery:
    """The app for workers of deployments at `redis_url` (or `MII_REDIS_URL`); Celery's
    broker is that Redis too, unless `MII_CELERY_BROKER_URL` names another (a deployment
    on a Redis Cluster needs one: `celery_broker_url`)."""
    url = redis_url or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    broker = celery_broker_url(url)
    app = Celery("mii", broker=broker, set_as_current=False)
    app.conf.mii_redis_url = None if broker == url else url  # None: the broker's (-b)
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        worker_pool="solo",  # the engine owns the process; CUDA is never forked
        worker_concurrency=1,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=True,
    )
    app.steps["worker"].add(EngineLoopStep)
    options = app.user_options["worker"]
    options.add(Option(["--deployment"], default=None, help="mii deployment to serve"))
    options.add(Option(["--replica"], type=int, default=0, help="which replica's devices"))
    options.add(Option(["--engine-factory"], default=None, help="module:function"))
    options.add(Option(["--metrics-port"], type=int, default=None, help="Prometheus port"))
    options.add(
        Option(["--metrics-address"], default=None, help="Prometheus interface (127.0.0.1)")
    )
    options.add(
        Option(["--task-prompt-chars"], default=None,
               help="prompt characters in Flower's task args (0: none; none: all)")
    )  # fmt: skip
    return app


app = make_app()


# ---- remote control -------------------------------------------------------------------
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
