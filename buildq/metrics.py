"""Prometheus metrics of the daemon, in one registry. Labels: topic and consumer group, or
queue, outcome, status; never a build id or partition key (unbounded cardinality)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.deliveries = Counter(
            "buildq_deliveries_total",
            "Deliveries handled, by outcome",
            ["topic", "outcome"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "buildq_handler_duration_seconds",
            "Time to handle one delivery (runner call and commit)",
            ["topic"],
            registry=r,
        )
        self.up = Gauge("buildq_up", "1 while the daemon is consuming", registry=r)

    def observe_delivery(self, topic: str, outcome: str, seconds: float) -> None:
        self.deliveries.labels(topic, outcome).inc()
        self.handler_seconds.labels(topic).observe(seconds)
