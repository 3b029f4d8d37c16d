"""The pieces behind /metrics, in process: runner calls, publishes, build results, dispatch lag."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from buildq.buildrunner import (
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerError,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.config import ConfigError, PollPolicy, load_config
from buildq.metrics import Metrics
from buildq.orchestrator import policy
from buildq.orchestrator.instrumented import InstrumentedRunner, RunnerHealth, observe_finished
from buildq.orchestrator.model import Build
from buildq.queue.contract import Message
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue
from tests.support.scrape import Scrape
from tests.support.waiting import wait_until


def scraped(metrics: Metrics) -> Scrape:
    text = generate_latest(metrics.registry).decode()
    return Scrape([s for f in text_string_to_metric_families(text) for s in f.samples])


class Flaky:
    """A runner whose status answers with whatever ``raises`` says next."""

    def __init__(self, *raises: BaseException | None) -> None:
        self.raises = list(raises)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        return BuildID("b-1")

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        err = self.raises.pop(0)
        if err is not None:
            raise err
        return BuildStatus.RUNNING, {}

    def cancel(self, build_id: BuildID) -> None:
        pass


def test_runner_calls_are_counted_by_outcome_and_timed():
    metrics = Metrics()
    errors = [
        None,
        BuildNotFound("gone"),
        TransientRunnerError("503"),
        RunnerError("401"),
        KeyError(),
    ]
    runner = InstrumentedRunner("bk", Flaky(*errors), metrics)
    runner.trigger("q", (), (Change("c"),))
    runner.cancel(BuildID("b-1"))
    for expected in errors:
        if expected is None:
            assert runner.status(BuildID("b-1")) == (BuildStatus.RUNNING, {})
        else:
            with pytest.raises(type(expected)):
                runner.status(BuildID("b-1"))
    s = scraped(metrics)
    assert s.series("buildq_runner_calls_total") == {
        (("method", m), ("outcome", o), ("runner", "bk")): 1.0
        for m, o in [
            ("trigger", "ok"),
            ("cancel", "ok"),
            ("status", "ok"),
            ("status", "not_found"),
            ("status", "transient"),
        ]
    } | {(("method", "status"), ("outcome", "error"), ("runner", "bk")): 2.0}
    assert s.value("buildq_runner_call_duration_seconds_count", method="status") == 5


def test_a_refused_runner_is_unhealthy_until_a_call_succeeds_logged_once_each_way():
    metrics = Metrics()
    health = RunnerHealth(metrics)
    refused = RunnerUnauthorized("GitHub answered 401 to GET /x: Bad credentials", "401 why")
    runner = InstrumentedRunner("gha", Flaky(refused, refused, None, refused), metrics, health)
    assert scraped(metrics).value("buildq_runner_healthy", runner="gha") == 1
    with capture_logs() as logs:
        for _ in range(2):
            with pytest.raises(RunnerUnauthorized):
                runner.status(BuildID("b-1"))
        assert health.problems() == {"gha": "401 why"}
        assert scraped(metrics).value("buildq_runner_healthy", runner="gha") == 0
        runner.status(BuildID("b-1"))
        assert health.problems() == {}
        assert scraped(metrics).value("buildq_runner_healthy", runner="gha") == 1
        with pytest.raises(RunnerUnauthorized):
            runner.status(BuildID("b-1"))
    assert [e["event"] for e in logs] == [
        "runner_unauthorized",
        "runner_authorized",
        "runner_unauthorized",
    ]
    calls = scraped(metrics).series("buildq_runner_calls_total")
    assert calls[(("method", "status"), ("outcome", "unauthorized"), ("runner", "gha"))] == 3


def test_publishes_and_duplicates_are_counted_apart_after_commit(db):
    metrics = Metrics()
    queue = SqlQueue(db, on_published=metrics.observe_published)
    queue.publish_many("t", [Message(id=f"m{i}", payload=b"", partition_key="p") for i in range(3)])
    queue.publish("t", Message(id="m0", payload=b"", partition_key="p"))  # a duplicate
    with queue.transaction() as tx:
        tx.publish("u", Message(id="x", payload=b"", partition_key="p"))
    with pytest.raises(RuntimeError), queue.transaction() as tx:
        tx.publish("u", Message(id="y", payload=b"", partition_key="p"))
        raise RuntimeError("rolled back: not published")
    s = scraped(metrics)
    assert s.series("buildq_published_total") == {(("topic", "t"),): 3, (("topic", "u"),): 1}
    assert s.series("buildq_publish_duplicates_total") == {(("topic", "t"),): 1}


def test_a_failing_publish_hook_is_logged_and_the_publish_stands(db):
    def broken(topic: str, results: object) -> None:
        raise ValueError("metrics broke")

    queue = SqlQueue(db, on_published=broken)
    with capture_logs() as logs:
        result = queue.publish("t", Message(id="m", payload=b"", partition_key="p"))
    assert not result.duplicate
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["publish_hook_failed"]


def test_a_delivery_knows_when_it_became_due_and_when_it_was_claimed(db):
    queue = SqlQueue(db)
    settings = SubscriptionSettings(slots=2, poll_interval_ms=20)
    sub = queue.subscribe("t", "g", settings)
    try:
        queue.publish("t", Message(id="now", payload=b"", partition_key="p"))
        queue.publish_after("t", Message(id="later", payload=b"", partition_key="q"), 300)
        fetched = []
        wait_until(lambda: fetched.extend(sub.fetch(10)) or len(fetched) == 2, timeout=10)
        rows = {
            r.message_id: r
            for r in db.read(
                lambda c: c.exec_driver_sql(
                    "SELECT message_id, created_at, visible_after FROM queue_messages"
                ).all()
            )
        }
        by_id = {d.message.id: d for d in fetched}
        assert by_id["now"].due_at_ms == rows["now"].created_at  # published for "now"
        assert by_id["later"].due_at_ms == rows["later"].visible_after
        for delivery in fetched:
            assert delivery.delivered_at_ms >= delivery.due_at_ms > 0
            delivery.ack()
    finally:
        sub.close()


def finished_build(status: str, reason: str | None, error: str | None) -> Build:
    return Build(
        request_id="r-1",
        build_id="b-1",
        queue="q",
        runner="bk",
        status=status,
        metadata={},
        request_metadata={},
        base=(),
        head=(),
        failure_reason=reason,
        error=error,
        polls=4,
        created_at_ms=1_000,
        updated_at_ms=61_000,
        finished_at_ms=61_000,
        next_poll_at_ms=None,
        cancel_requested_at_ms=None,
    )


def test_build_results_are_bounded_labels_and_deadlines_are_told_apart():
    metrics = Metrics()
    poll = PollPolicy(start_by_s=10, finish_by_s=100)
    accepted = finished_build("ACCEPTED", None, None)
    running = finished_build("RUNNING", None, None)
    start_missed = policy.deadline_passed(
        poll, accepted.created_at_ms, accepted.build_status, accepted.created_at_ms + 10_000
    )
    finish_missed = policy.deadline_passed(
        poll, running.created_at_ms, running.build_status, running.created_at_ms + 100_000
    )
    for build in [
        finished_build("FAILED", "timeout", start_missed),
        finished_build("FAILED", "timeout", finish_missed),
        finished_build("FAILED", "timeout", None),  # the CI system's own timeout
        finished_build("FAILED", "a-vendor-said-something", None),
        finished_build("SUCCEEDED", None, None),
    ]:
        observe_finished(metrics, build.finished())
    s = scraped(metrics)
    assert s.series("buildq_build_deadline_timeouts_total") == {
        (("deadline", "start_by"),): 1,
        (("deadline", "finish_by"),): 1,
    }
    assert s.series("buildq_builds_finished_total") == {
        (("failure_reason", "timeout"), ("status", "FAILED")): 3,
        (("failure_reason", "other"), ("status", "FAILED")): 1,
        (("failure_reason", "none"), ("status", "SUCCEEDED")): 1,
    }
    assert s.value("buildq_build_duration_seconds_sum") == 5 * 60.0
    assert s.value("buildq_build_polls_sum") == 5 * 4


def test_metrics_refresh_interval_is_configurable_and_checked():
    base = {"BUILDQ_DATABASE__URL": "sqlite:///x.db"}
    assert load_config(None, base).http.metrics_refresh_s == 10.0
    refresh = {**base, "BUILDQ_HTTP__METRICS_REFRESH_S": "2.5"}
    assert load_config(None, refresh).http.metrics_refresh_s == 2.5
    with pytest.raises(ConfigError, match=r"http\.metrics_refresh_s"):
        load_config(None, {**base, "BUILDQ_HTTP__METRICS_REFRESH_S": "0"})
