"""Flower's Prometheus `/metrics` behind the same authentication as its other pages.

Flower 2.2 serves `/metrics` to anyone, even with `--basic-auth` on (for scrapers that send
no credentials), and its metrics name every worker and task. `protect_metrics()` swaps the
handler for one that requires the credentials (Prometheus sends them with its scrape
config's `basic_auth`); without authentication configured it answers everyone, as before.
`/healthcheck` stays open for load balancers.
"""

from __future__ import annotations

from flower import urls
from flower.views.monitor import Metrics
from tornado import web

METRICS_PATH = r"/metrics"


class AuthenticatedMetrics(Metrics):
    @web.authenticated
    async def get(self):
        await super().get()


def protect_metrics() -> None:
    """Swap Flower's `/metrics` handler (in its URL table, before Flower is built). Flower's
    app reads the same list object, so this runs in the `mii flower` process only."""
    for i, handler in enumerate(urls.handlers):
        if isinstance(handler, tuple) and handler[0] == METRICS_PATH:
            urls.handlers[i] = (METRICS_PATH, AuthenticatedMetrics, *handler[2:])
            return
    raise RuntimeError("Flower has no /metrics route to protect: check its version")
