"""Instrumentation the daemon wires around its parts, so that those stay free of metrics code.

- ``InstrumentedRunner``: a BuildRunner that counts and times each call of the runner it
  wraps, by outcome, and ``RunnerHealth``: which runners their CI service refuses.
- ``observe_finished``: counts a build whose result committed (the daemon calls it with the
  builds a batch's build writes finished, after the batch's transaction commits).
- ``StatsRefresher``: reads the database gauges every ``[http] metrics_refresh_s``, with one
  aggregate query on the queue and one on the live builds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import structlog

from buildq.buildrunner import (
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildRunner,
    BuildStatus,
    Change,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.metrics import BuildGauges, Metrics, QueueGauges
from buildq.orchestrator.model import FinishedBuild
from buildq.orchestrator.sqlstore import LIVE, SqlBuildStore
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.stats import TopicStats
from buildq.storage.database import Database
from buildq.storage.errors import first_line

log = structlog.get_logger("buildq.metrics")

T = TypeVar("T")


class RunnerHealth:
    """Which runners their CI service refuses right now (``RunnerUnauthorized``).

    A runner is unhealthy from such an answer until one of its calls succeeds again (the
    service accepted the token). Each change is logged once (``runner_unauthorized`` warning,
    ``runner_authorized`` info), shown by ``buildq_runner_healthy`` and by /readyz, which
    fails while any runner is refused.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._lock = threading.Lock()
        self._refused: dict[str, str] = {}  # runner -> summary (no build ids)

    def add(self, name: str) -> None:
        self._metrics.runner_healthy.labels(name).set(1)

    def refused(self, name: str, method: str, err: RunnerUnauthorized) -> None:
        with self._lock:
            first = name not in self._refused
            self._refused[name] = err.summary
        if first:
            self._metrics.runner_healthy.labels(name).set(0)
            log.warning("runner_unauthorized", runner=name, method=method, error=str(err)[:500])

    def answered(self, name: str) -> None:
        with self._lock:
            was_refused = self._refused.pop(name, None) is not None
        if was_refused:
            self._metrics.runner_healthy.labels(name).set(1)
            log.info("runner_authorized", runner=name)

    def problems(self) -> dict[str, str]:
        with self._lock:
            return dict(self._refused)


class InstrumentedRunner:
    """Counts and times every call to ``inner`` as ``runner``/``method``/``outcome``, and
    tells ``health`` whether the CI service accepted the runner's credentials."""

    def __init__(
        self,
        name: str,
        inner: BuildRunner,
        metrics: Metrics,
        health: RunnerHealth | None = None,
    ) -> None:
        self.name = name
        self.inner = inner
        self.metrics = metrics
        self.health = health or RunnerHealth(metrics)
        self.health.add(name)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        return self._call("trigger", lambda: self.inner.trigger(queue, base, head, metadata))

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        return self._call("status", lambda: self.inner.status(build_id))

    def cancel(self, build_id: BuildID) -> None:
        self._call("cancel", lambda: self.inner.cancel(build_id))

    def _call(self, method: str, call: Callable[[], T]) -> T:
        outcome = "error"
        started = time.monotonic()
        try:
            result = call()
            outcome = "ok"
            self.health.answered(self.name)
            return result
        except BuildNotFound:
            outcome = "not_found"
            raise
        except RunnerUnauthorized as err:
            outcome = "unauthorized"
            self.health.refused(self.name, method, err)
            raise
        except TransientRunnerError:
            outcome = "transient"
            raise
        finally:
            elapsed = time.monotonic() - started
            self.metrics.observe_runner_call(self.name, method, outcome, elapsed)


def observe_finished(metrics: Metrics, build: FinishedBuild) -> None:
    """Count a build whose result just committed: its result, duration and polls."""
    metrics.observe_build_finished(
        build.status,
        build.failure_reason,
        (build.finished_at_ms - build.created_at_ms) / 1000,
        build.polls,
        _deadline_missed(build),
    )


def _deadline_missed(build: FinishedBuild) -> str | None:
    """``start_by``/``finish_by`` for a build the poll loop timed out (policy.deadline_passed
    names the key in the error it records); None otherwise, e.g. for a CI system's own
    timeout, which also reports ``failure_reason = timeout``."""
    if build.failure_reason != "timeout" or not build.error:
        return None
    for deadline in ("start_by", "finish_by"):
        if f"{deadline}_s=" in build.error:
            return deadline
    return None


# --- database gauges ---------------------------------------------------------------------------


class StatsRefresher:
    """Reads the queue and build gauges into ``metrics.database`` (see buildq.metrics)."""

    def __init__(
        self, db: Database, admin: QueueAdmin, metrics: Metrics, queues: Iterable[str]
    ) -> None:
        self.db = db
        self.admin = admin
        self.metrics = metrics
        self.queues = tuple(queues)

    def run(self, interval_s: float, stopping: threading.Event) -> None:
        """Refresh now and every ``interval_s`` until ``stopping``; a failure keeps the last
        values (``buildq_stats_refreshed_timestamp_seconds`` shows their age)."""
        while not stopping.is_set():
            try:
                self.refresh()
            except Exception as err:
                self.metrics.stats_failures.inc()
                log.warning("metrics_refresh_failed", error=first_line(err))
            stopping.wait(interval_s)

    def refresh(self) -> None:
        stats = self.admin.topic_stats(count_messages=False)
        rows = SqlBuildStore(self.db).live_summary()
        self.metrics.database.update(_queue_gauges(stats), _build_gauges(rows, self.queues))


def _queue_gauges(stats: Sequence[TopicStats]) -> list[QueueGauges]:
    return [
        QueueGauges(
            topic=topic.topic,
            group=group.group,
            ready=group.ready,
            delayed=group.delayed,
            in_flight=group.in_flight,
            dead_letters=group.dead_letters,
            oldest_ready_age_s=max(0, group.oldest_ready_age_ms or 0) / 1000,
        )
        for topic in stats
        for group in topic.groups
    ]


def _build_gauges(rows: Sequence[Any], queues: Sequence[str]) -> list[BuildGauges]:
    """One gauge per (queue, live status): the configured queues always, at 0 when empty."""
    gauges = {(q, s): BuildGauges(q, s, 0, 0.0) for q in queues for s in LIVE}
    for row in rows:
        queue, status = row["queue"], row["status"]
        age_s = max(0, int(row["oldest_age_ms"])) / 1000
        gauges[(queue, status)] = BuildGauges(queue, status, int(row["builds"]), age_s)
    return [gauges[key] for key in sorted(gauges)]
