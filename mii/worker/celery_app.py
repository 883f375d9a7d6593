"""The Celery app whose workers host mii's engine loop: `celery -A mii.worker.celery_app worker`
(or `mii worker`, which wraps it).

Generation requests do not travel as Celery messages: they come through the deployment's
Redis streams, which a bootstep's engine loop reads. Celery supplies what an operator of a
fleet expects: workers and every request visible in Flower (task events of `mii.generate`),
engine statistics in `celery inspect stats`, remote control (`mii_pause`, `mii_resume`,
`shutdown`), and its worker lifecycle (SIGTERM drains). JSON only on the wire, never pickle.
"""

from __future__ import annotations

import os

from celery import Celery
from click import Option

from mii.broker_config.settings import DEFAULT_REDIS_URL, REDIS_URL_ENV
from mii.worker import celery_control  # noqa: F401 (registers the remote-control commands)
from mii.worker.bootstep import EngineLoopStep
from mii.worker.engine_factory import DEFAULT_FACTORY


def make_app(redis_url: str | None = None) -> Celery:
    url = redis_url or os.environ.get(REDIS_URL_ENV) or DEFAULT_REDIS_URL
    app = Celery("mii", broker=url, set_as_current=False)
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
    options.add(Option(["--engine-factory"], default=DEFAULT_FACTORY, help="module:function"))
    options.add(Option(["--metrics-port"], type=int, default=None, help="Prometheus port"))
    options.add(
        Option(["--metrics-address"], default=None, help="Prometheus interface (127.0.0.1)")
    )
    return app


app = make_app()
