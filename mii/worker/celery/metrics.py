"""Prometheus metrics of a worker, read from its engine and loop at each scrape.

They listen on the loopback interface unless told otherwise (`--metrics-address`): request
counts and engine state are for the operator's scraper, not for the network."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_GAUGES = {
    "num_running": "requests in the engine's running set",
    "num_waiting": "requests waiting for their prompt to be scheduled",
    "kv_blocks_total": "KV cache blocks",
    "kv_blocks_free": "free KV cache blocks",
}
DEFAULT_METRICS_ADDRESS = "127.0.0.1"
_COUNTERS = {"tokens_generated": "tokens generated", "prompt_tokens_processed": "prompt tokens"}


class EngineCollector:
    def __init__(self, step) -> None:
        self.step = step

    def collect(self):
        stats = self.step.statistics()
        labels = [str(stats.get("deployment")), str(stats.get("replica", 0))]
        engine = stats.get("engine", {})
        for name, doc in _GAUGES.items():
            family = GaugeMetricFamily(f"mii_{name}", doc, labels=["deployment", "replica"])
            family.add_metric(labels, engine.get(name, 0))
            yield family
        for name, doc in _COUNTERS.items():
            family = CounterMetricFamily(f"mii_{name}", doc, labels=["deployment", "replica"])
            family.add_metric(labels, engine.get(name, 0))
            yield family
        published = CounterMetricFamily(
            "mii_tokens_published", "tokens sent to clients", labels=["deployment", "replica"]
        )
        published.add_metric(labels, stats.get("tokens_published", 0))
        yield published


def serve_metrics(step, port: int, address: str | None = None):
    """Serve `step.statistics()` as Prometheus metrics on `address:port` (None: loopback
    only). Returns the HTTP server and its thread."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(step))
    return start_http_server(port, addr=address or DEFAULT_METRICS_ADDRESS, registry=registry)
