"""The gateway's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Requests by route and status; histograms of time to first token (streamed requests),
time per output token and end-to-end latency; prompt and generated tokens; the depth of
the deployment's request streams and its live workers, read when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_PER_TOKEN_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mii_gateway_requests", "HTTP requests answered",
                                ["route", "status"], registry=r)  # fmt: skip
        self.ttft = Histogram("mii_gateway_time_to_first_token_seconds",
                              "Time to the first token of a streamed request", ["route"],
                              buckets=_LATENCY_S, registry=r)  # fmt: skip
        self.tpot = Histogram("mii_gateway_time_per_output_token_seconds",
                              "Time per output token after the first", ["route"],
                              buckets=_PER_TOKEN_S, registry=r)  # fmt: skip
        self.e2e = Histogram("mii_gateway_e2e_request_latency_seconds",
                             "Time from request to its last token", ["route"],
                             buckets=_LATENCY_S, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("mii_gateway_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = Counter("mii_gateway_generation_tokens", "Generated tokens",
                                        registry=r)  # fmt: skip
        self.queue_depth = Gauge("mii_gateway_queue_depth", "Entries in a request stream",
                                 ["stream"], registry=r)  # fmt: skip
        self.live_workers = Gauge("mii_gateway_live_workers", "Workers with a fresh heartbeat",
                                  registry=r)  # fmt: skip

    def exposition(self, depths: dict[str, int], live: int) -> bytes:
        for stream, depth in depths.items():
            self.queue_depth.labels(stream).set(depth)
        self.live_workers.set(live)
        return generate_latest(self.registry)


class Timing:
    """One generation request's clock: start, first token, end."""

    def __init__(self, metrics: GatewayMetrics, route: str) -> None:
        self.metrics, self.route = metrics, route
        self.start = time.perf_counter()
        self.first: float | None = None

    def token(self) -> None:
        if self.first is None:
            self.first = time.perf_counter()
            self.metrics.ttft.labels(self.route).observe(self.first - self.start)

    def done(self, prompt_tokens: int, generated_tokens: int) -> None:
        end = time.perf_counter()
        self.metrics.e2e.labels(self.route).observe(end - self.start)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        self.metrics.generated_tokens.inc(generated_tokens)
        if self.first is not None and generated_tokens > 1:
            self.metrics.tpot.labels(self.route).observe(
                (end - self.first) / (generated_tokens - 1)
            )
