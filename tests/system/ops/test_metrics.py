"""/metrics of a real daemon process while sim builds run, checked against the database."""

from __future__ import annotations

import pytest

from buildq.buildrunner import BuildStatus
from buildq.metrics import FAILURE_REASONS
from buildq.orchestrator import topics
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.contract import Message
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql.admin import QueueAdmin
from tests.support.scrape import Scrape, get, ops_port, scrape
from tests.support.waiting import wait_until

FAST_REFRESH = {"BUILDQ_HTTP__METRICS_REFRESH_S": "0.3"}

BUSY = """
[runners.sim]
type = "sim"
accepted_s = 0.2
accepted_max_s = 0.5
running_s = 0.8
running_max_s = 1.5
failure_probability = 0.3
seed = 11
state_dir = "{state}"
status_fault_file = "{fault}"

[runners.sim.queues.late]
accepted_s = 600

[queues.main]
runner = "sim"

[queues.main.poll]
accepted_interval_s = 0.3
running_interval_s = 0.3
growth = 1.1
max_interval_s = 0.5
jitter = 0.1

[queues.late]
runner = "sim"

[queues.late.poll]
accepted_interval_s = 0.3
start_by_s = 1.5
"""

QUIET = """
[runners.sim]
type = "sim"
accepted_s = 600

[queues.main]
runner = "sim"

[queues.main.poll]
accepted_interval_s = 600
"""

CONSUMED = {topics.BUILD, topics.BUILDSIGNAL, topics.BUILD_DLQ, topics.BUILDSIGNAL_DLQ}
BOUNDED_LABELS = {
    "topic": CONSUMED | {topics.BUILDRESULT, "ops_probe"},
    "group": {topics.GROUP, "watcher"},
    "outcome": {
        "ack",
        "nack",
        "reject",
        "lost",
        "defer",
        "handed_back",
        "ok",
        "not_found",
        "transient",
        "unauthorized",
        "error",
    },
    "status": {s.value for s in BuildStatus},
    "failure_reason": FAILURE_REASONS | {"none", "other"},
    "runner": {"sim"},
    "method": {"trigger", "status", "cancel"},
    "deadline": {"start_by", "finish_by"},
    "queue": {"main", "late"},
}


def bad_request() -> Message:
    return Message(id="bad/request/1", payload=b"not json", partition_key="bad")


def assert_bounded_labels(world, scraped: Scrape) -> None:
    """Labels come from small fixed sets: never an id or a partition key."""
    ids = {r.request_id for r in world.builds()} | {r.build_id for r in world.builds()}
    for row in world.rows("SELECT message_id, partition_key FROM queue_messages"):
        ids |= {row.message_id, row.partition_key}
    values = scraped.label_values()
    values.pop("le", None)  # histogram bucket bounds
    for name, seen in values.items():
        assert seen <= BOUNDED_LABELS[name], (name, seen - BOUNDED_LABELS[name])
        assert not seen & ids, (name, seen & ids)


def test_counters_move_while_builds_run_and_build_metrics_match_the_database(
    daemon, world, tmp_path
):
    fault = tmp_path / "status-fault"
    body = BUSY.format(state=tmp_path / "sim", fault=fault)
    d = daemon(body, env=FAST_REFRESH).start()
    port = ops_port(d)
    fault.touch()  # the runner fails status calls: transient outcomes, nacks
    world.submit("main", 20)
    world.submit("late", 4, prefix="late")
    world.queue.publish(topics.BUILD, bad_request())  # rejected: DLQ, then failed by the reconciler

    first = wait_until(
        lambda: (
            (s := scrape(port)).value(
                "buildq_runner_calls_total", method="status", outcome="transient"
            )
            and s
        ),
        timeout=30,
        message="a transient runner call counted",
    )
    fault.unlink()
    wait_until(lambda: world.all_terminal(25), timeout=90, message="all builds terminal")

    def settled() -> Scrape | None:
        s = scrape(port)
        done = s.value("buildq_builds_finished_total") == 25 and s.value("buildq_builds") == 0
        return s if done and s.value("buildq_queue_dead_letters", topic="build") == 1 else None

    last = wait_until(settled, timeout=30, message="every finished build counted")
    for name, labels in [
        ("buildq_deliveries_total", {"topic": "buildsignal", "outcome": "ack"}),
        ("buildq_published_total", {"topic": "buildsignal"}),
        ("buildq_published_total", {"topic": "buildresult"}),
        ("buildq_runner_calls_total", {"method": "status", "outcome": "ok"}),
        ("buildq_handler_duration_seconds_count", {"topic": "buildsignal"}),
        ("buildq_dispatch_lag_seconds_count", {"topic": "buildsignal"}),
    ]:
        assert last.value(name, **labels) > first.value(name, **labels), (name, labels)
    assert_build_metrics_match(world, last)
    assert_queue_counters_match(world, last)
    assert_bounded_labels(world, last)
    assert d.stop() == 0


def assert_build_metrics_match(world, s: Scrape) -> None:
    builds = world.builds()
    by_result: dict[tuple[str, str], int] = {}
    for b in builds:
        key = (b.status, b.failure_reason or "none")
        by_result[key] = by_result.get(key, 0) + 1
    counted = {
        (dict(k)["status"], dict(k)["failure_reason"]): v
        for k, v in s.series("buildq_builds_finished_total").items()
    }
    assert counted == by_result
    assert s.value("buildq_build_polls_count") == len(builds)
    assert s.value("buildq_build_polls_sum") == sum(b.polls for b in builds)
    durations = sum((b.finished_at - b.created_at) / 1000 for b in builds)
    assert s.value("buildq_build_duration_seconds_sum") == pytest.approx(durations, abs=1e-6)
    late = [b for b in builds if b.queue == "late"]
    assert {(b.status, b.failure_reason) for b in late} == {("FAILED", "timeout")}
    assert s.value("buildq_build_deadline_timeouts_total", deadline="start_by") == len(late)
    assert s.value("buildq_build_deadline_timeouts_total", deadline="finish_by") == 0
    assert s.value("buildq_runner_calls_total", method="trigger", outcome="ok") == 24
    assert s.value("buildq_runner_calls_total", method="cancel") >= len(late)
    assert s.value("buildq_runner_call_duration_seconds_count", method="trigger") == 24
    # The configured queues report zero live builds rather than nothing.
    assert s.series("buildq_builds").keys() >= {
        (("queue", q), ("status", st)) for q in ("main", "late") for st in ("ACCEPTED", "RUNNING")
    }


def assert_queue_counters_match(world, s: Scrape) -> None:
    def messages(topic: str) -> int:
        rows = world.rows("SELECT COUNT(*) AS n FROM queue_messages WHERE topic = :t", t=topic)
        return int(rows[0].n)

    assert s.value("buildq_published_total", topic="buildsignal") == messages("buildsignal")
    assert s.value("buildq_published_total", topic="buildresult") == messages("buildresult") == 25
    assert s.value("buildq_published_total", topic="build") == 0  # the test published those
    assert s.value("buildq_deliveries_total", topic="build", outcome="ack") == 24
    assert s.value("buildq_deliveries_total", topic="build", outcome="reject") == 1
    assert s.value("buildq_deliveries_total", topic="build_dlq", outcome="ack") >= 1
    nacks = s.value("buildq_deliveries_total", topic="buildsignal", outcome="nack")
    transient = s.value("buildq_runner_calls_total", method="status", outcome="transient")
    assert nacks >= transient >= 1  # every transient status call is a nack


def test_gauges_equal_what_the_database_says(daemon, world, tmp_path):
    d = daemon(QUIET, env=FAST_REFRESH).start()
    port = ops_port(d)
    requests = world.submit("main", 6)
    world.queue.publish(topics.BUILD, bad_request())
    # A group of the test's own with ready, delayed and in-flight deliveries that stay put.
    watcher = world.queue.subscribe(
        "ops_probe", "watcher", SubscriptionSettings(slots=4, visibility_timeout_ms=600_000)
    )
    try:
        world.queue.publish_many(
            "ops_probe",
            [Message(id=f"m{i}", payload=b"{}", partition_key=f"p{i}") for i in range(6)],
        )
        world.queue.publish_many(
            "ops_probe",
            [Message(id=f"later{i}", payload=b"{}", partition_key="q") for i in range(3)],
            delay_ms=600_000,
        )
        wait_until(lambda: watcher.fetch(2), message="the watcher holds two deliveries")
        admin = QueueAdmin(world.db, world.queue.store)

        def quiet() -> bool:
            live = [b for b in world.builds() if b.build_id is not None and b.status == "ACCEPTED"]
            stats = {(t.topic, g.group): g for t in admin.topic_stats() for g in t.groups}
            build, dlq = stats.get(("build", "buildq")), stats.get(("build_dlq", "buildq"))
            return (
                len(live) == len(requests)
                and build is not None
                and build.pending == 0
                and build.dead_letters == 1
                and dlq is not None
                and dlq.pending == 0
            )

        wait_until(quiet, timeout=30, message="every build triggered and waiting")
        wait_until(lambda: gauges_match(world, admin, scrape(port)), timeout=15)
        assert get(port, "/healthz").status_code == 200
        assert get(port, "/readyz").status_code == 200
        assert_bounded_labels(world, scrape(port))
    finally:
        watcher.close()
    assert d.stop() == 0


def gauges_match(world, admin: QueueAdmin, s: Scrape) -> bool:
    """The scraped gauges are what the database says now (ages within a refresh or two)."""
    expected = {}
    for topic in admin.topic_stats(count_messages=False):
        for g in topic.groups:
            key = (("group", g.group), ("topic", topic.topic))
            expected[key] = (g.ready, g.delayed, g.in_flight, g.dead_letters)
    scraped = {
        key: tuple(
            s.series(f"buildq_queue_{name}").get(key)
            for name in ("ready", "delayed", "in_flight", "dead_letters")
        )
        for key in expected
    }
    probe = expected[(("group", "watcher"), ("topic", "ops_probe"))]
    assert probe == (4, 3, 2, 0), probe  # the fixture is what it should be
    if scraped != expected or set(s.series("buildq_queue_ready")) != set(expected):
        return False
    [row] = world.rows(
        "SELECT COUNT(*) AS n, MIN(created_at) AS oldest FROM builds WHERE status = 'ACCEPTED'"
    )
    now_ms = SqlBuildStore(world.db).now_ms()
    [ready_ms] = [
        g.oldest_ready_age_ms
        for t in admin.topic_stats(count_messages=False)
        for g in t.groups
        if (t.topic, g.group) == ("ops_probe", "watcher")
    ]
    # Ages move with the clock: the scrape's are at most a refresh (0.3 s) old.
    ready_age = s.value("buildq_queue_oldest_ready_age_seconds", topic="ops_probe")
    build_age = s.value("buildq_builds_oldest_age_seconds", queue="main", status="ACCEPTED")
    return (
        abs(ready_age - ready_ms / 1000) < 2.0
        and abs(build_age - (now_ms - row.oldest) / 1000) < 2.0
        and s.value("buildq_builds", queue="main", status="ACCEPTED") == row.n == 6
        and s.value("buildq_builds", queue="main", status="RUNNING") == 0
    )
