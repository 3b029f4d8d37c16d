"""Prometheus metrics of the daemon, in one registry per daemon (no global state).

Two kinds, documented in docs/operations.md#metrics:

- **Events of this process** (counters, histograms), observed as they happen: deliveries and
  their outcomes, publishes, dispatch lag, builds finished, runner calls.
- **Database gauges** (queue depths, live builds), the same in every replica: read by the
  daemon's refresher thread every ``[http] metrics_refresh_s`` with one aggregate query each
  and kept in ``DatabaseGauges``, which a scrape only reads. A scrape therefore never touches
  the database: its cost does not depend on how often or by how many it is scraped, and a
  database outage cannot make it hang.

Every label is a bounded set (topic, consumer group, outcome, runner, method, status, failure
reason, queue, deadline); never a build id, request id, message id or partition key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from buildq.queue.contract import PublishResult

#: ``failure_reason`` values a build may finish with (docs/runners.md); others count as "other".
FAILURE_REASONS = frozenset({"verdict", "timeout", "infra", "lost", "cancelled"})

_HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
_BUILD_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)
_POLL_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
_RUNNER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class QueueGauges:
    """One consumer group's deliveries of one topic, as the database has them now."""

    topic: str
    group: str
    ready: int
    delayed: int
    in_flight: int
    dead_letters: int
    oldest_ready_age_s: float  # 0 when nothing is ready


@dataclass(frozen=True, slots=True)
class BuildGauges:
    """Live (not terminal) builds of one queue in one status."""

    queue: str
    status: str
    count: int
    oldest_age_s: float  # since trigger; 0 when there are none


class DatabaseGauges:
    """A Prometheus collector over the last snapshot the refresher read (see module doc)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: Sequence[QueueGauges] = ()
        self._builds: Sequence[BuildGauges] = ()
        self._refreshed_at = 0.0

    def update(self, queue: Sequence[QueueGauges], builds: Sequence[BuildGauges]) -> None:
        with self._lock:
            self._queue, self._builds = tuple(queue), tuple(builds)
            self._refreshed_at = time.time()

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            queue, builds, refreshed_at = self._queue, self._builds, self._refreshed_at
        for attribute, name, help_text in _QUEUE_GAUGES:
            family = GaugeMetricFamily(f"buildq_{name}", help_text, labels=["topic", "group"])
            for q in queue:
                family.add_metric([q.topic, q.group], getattr(q, attribute))
            yield family
        for attribute, name, help_text in _BUILD_GAUGES:
            family = GaugeMetricFamily(f"buildq_{name}", help_text, labels=["queue", "status"])
            for b in builds:
                family.add_metric([b.queue, b.status], getattr(b, attribute))
            yield family
        yield GaugeMetricFamily(
            "buildq_stats_refreshed_timestamp_seconds",
            "When the database gauges were last read (Unix time; 0: never)",
            value=refreshed_at,
        )


#: (field of QueueGauges, metric name after ``buildq_``, help)
_QUEUE_GAUGES = (
    ("ready", "queue_ready", "Deliveries due now, waiting for a worker"),
    ("delayed", "queue_delayed", "Deliveries not due yet (delayed publish or nack backoff)"),
    ("in_flight", "queue_in_flight", "Deliveries claimed by a worker and not settled yet"),
    ("dead_letters", "queue_dead_letters", "Dead letters the group left in <topic>_dlq"),
    (
        "oldest_ready_age_s",
        "queue_oldest_ready_age_seconds",
        "How long the oldest ready delivery has been waiting (0: none ready)",
    ),
)
#: (field of BuildGauges, metric name after ``buildq_``, help)
_BUILD_GAUGES = (
    ("count", "builds", "Builds not finished yet, by queue and status"),
    (
        "oldest_age_s",
        "builds_oldest_age_seconds",
        "Age since trigger of the oldest build not finished yet (0: none)",
    ),
)


class Metrics:
    """The daemon's metrics; ``registry`` is what ``/metrics`` serves."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        # No `*_created` series: they were ~9% of all series, and nothing here needs a
        # counter's creation time (rate() copes with restarts). The switch is process-wide in
        # prometheus_client (and untyped); the daemon has one registry per process anyway.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = r = CollectorRegistry()
        group = ["topic", "group"]
        self.deliveries = Counter(
            "buildq_deliveries_total",
            "Deliveries handled, by outcome (ack, nack, reject, lost)",
            [*group, "outcome"],
            registry=r,
        )
        self.handler_seconds = Histogram(
            "buildq_handler_duration_seconds",
            "Time to handle one delivery: controller, runner call and commit",
            group,
            buckets=_HANDLER_BUCKETS,
            registry=r,
        )
        self.dispatch_lag = Histogram(
            "buildq_dispatch_lag_seconds",
            "How late a delivery was claimed after it became due",
            group,
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.published = Counter(
            "buildq_published_total", "Messages published (committed)", ["topic"], registry=r
        )
        self.duplicates = Counter(
            "buildq_publish_duplicates_total",
            "Publishes of an id that already existed: nothing written",
            ["topic"],
            registry=r,
        )
        self._build_metrics(r)
        self._runner_metrics(r)
        self._worker_metrics(r)
        self.up = Gauge("buildq_up", "1 while the daemon is consuming", registry=r)
        self.database_up = Gauge(
            "buildq_database_up", "1 while the daemon's database probe succeeds", registry=r
        )
        self.database_writable = Gauge(
            "buildq_database_writable",
            "0 while the database refuses the daemon's writes (hand-offs or lease renewals"
            " failing: down, or a full disk); everything is retried meanwhile",
            registry=r,
        )
        self.stats_failures = Counter(
            "buildq_stats_refresh_failures_total",
            "Failed reads of the database gauges (they keep their last values)",
            registry=r,
        )
        self.database = DatabaseGauges()
        r.register(self.database)

    def _build_metrics(self, r: CollectorRegistry) -> None:
        result = ["status", "failure_reason"]
        self.builds_finished = Counter(
            "buildq_builds_finished_total",
            "Builds this daemon finished, by result",
            result,
            registry=r,
        )
        self.build_seconds = Histogram(
            "buildq_build_duration_seconds",
            "Build time from trigger to the recorded result, by result",
            result,
            buckets=_BUILD_BUCKETS,
            registry=r,
        )
        self.build_polls = Histogram(
            "buildq_build_polls",
            "Status polls a build took until its result, by status",
            ["status"],
            buckets=_POLL_BUCKETS,
            registry=r,
        )
        self.deadline_timeouts = Counter(
            "buildq_build_deadline_timeouts_total",
            "Builds cancelled and failed for missing a deadline (start_by or finish_by)",
            ["deadline"],
            registry=r,
        )

    def _runner_metrics(self, r: CollectorRegistry) -> None:
        self.runner_calls = Counter(
            "buildq_runner_calls_total",
            "Calls to CI runners, by outcome (ok, not_found, transient, unauthorized, error)",
            ["runner", "method", "outcome"],
            registry=r,
        )
        self.runner_seconds = Histogram(
            "buildq_runner_call_duration_seconds",
            "Latency of calls to CI runners",
            ["runner", "method"],
            buckets=_RUNNER_BUCKETS,
            registry=r,
        )
        self.runner_healthy = Gauge(
            "buildq_runner_healthy",
            "0 while the CI service refuses the runner's credentials (401, 403, or a 404 for "
            "a build it created), 1 otherwise",
            ["runner"],
            registry=r,
        )

    def _worker_metrics(self, r: CollectorRegistry) -> None:
        self.lane_wait = Histogram(
            "buildq_lane_wait_seconds",
            "How long a delivery waited for a free call slot of its runner's lane",
            ["lane"],
            buckets=_LAG_BUCKETS,
            registry=r,
        )
        self.lane_running = Gauge(
            "buildq_lane_calls_running",
            "Runner calls in progress, by lane (a runner; a hung CI service keeps it full)",
            ["lane"],
            registry=r,
        )
        self.lane_waiting = Gauge(
            "buildq_lane_calls_waiting",
            "Deliveries waiting for a free call slot, by lane",
            ["lane"],
            registry=r,
        )
        self.lane_oldest = Gauge(
            "buildq_lane_oldest_call_seconds",
            "How long the oldest delivery in a runner's lane has waited on it, queued or in a"
            " call (0: none): a CI service that stopped answering shows here",
            ["lane"],
            registry=r,
        )
        self.commit_steps = Histogram(
            "buildq_commit_batch_steps",
            "Deliveries settled per transaction (the hand-off batches)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.commit_failures = Counter(
            "buildq_commit_failures_total",
            "Hand-off batches the database could not take (down, deadlock, disk full): each is"
            " retried with back-off, and nothing is counted against the messages",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "buildq_commit_duration_seconds",
            "Time to commit one batch of hand-offs",
            buckets=_RUNNER_BUCKETS,
            registry=r,
        )

    # --- observations -----------------------------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the hot path observes the same few series
        thousands of times a second, and ``labels()`` takes a lock and builds a key each time."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe_lane_wait(self, lane: str, seconds: float) -> None:
        self._child(self.lane_wait, lane).observe(max(0.0, seconds))

    def set_lane_load(self, lane: str, running: int, waiting: int, oldest_s: float) -> None:
        self.lane_running.labels(lane).set(running)
        self.lane_waiting.labels(lane).set(waiting)
        self.lane_oldest.labels(lane).set(round(oldest_s, 3))

    def observe_commit_failure(self) -> None:
        self.commit_failures.inc()

    def observe_commit(self, steps: int, seconds: float) -> None:
        self.commit_steps.observe(steps)
        self.commit_seconds.observe(seconds)

    def observe_delivery(self, topic: str, group: str, outcome: str, seconds: float) -> None:
        self._child(self.deliveries, topic, group, outcome).inc()
        self._child(self.handler_seconds, topic, group).observe(seconds)

    def observe_dispatch_lag(self, topic: str, group: str, seconds: float) -> None:
        self._child(self.dispatch_lag, topic, group).observe(max(0.0, seconds))

    def observe_published(self, topic: str, results: Sequence[PublishResult]) -> None:
        duplicates = sum(1 for result in results if result.duplicate)
        if len(results) > duplicates:
            self.published.labels(topic).inc(len(results) - duplicates)
        if duplicates:
            self.duplicates.labels(topic).inc(duplicates)

    def observe_build_finished(
        self,
        status: str,
        failure_reason: str | None,
        duration_s: float,
        polls: int,
        deadline: str | None = None,
    ) -> None:
        if not failure_reason:
            reason = "none"
        else:
            reason = failure_reason if failure_reason in FAILURE_REASONS else "other"
        self.builds_finished.labels(status, reason).inc()
        self.build_seconds.labels(status, reason).observe(max(0.0, duration_s))
        self.build_polls.labels(status).observe(polls)
        if deadline is not None:
            self.deadline_timeouts.labels(deadline).inc()

    def observe_runner_call(self, runner: str, method: str, outcome: str, seconds: float) -> None:
        self._child(self.runner_calls, runner, method, outcome).inc()
        self._child(self.runner_seconds, runner, method).observe(seconds)
