"""The daemon as a real process: the poll loop end to end, crashes, stops, faults, deadlines."""

from __future__ import annotations

import signal
import subprocess
from collections import Counter
from datetime import datetime

import pytest

from buildq.buildrunner import BuildID
from buildq.orchestrator import topics
from buildq.queue.contract import Message
from tests.support.daemon import BUILDQ, noop_queue
from tests.support.waiting import wait_until

SIM = """
[runners.sim]
type = "sim"
accepted_s = 0.5
accepted_max_s = 1.0
running_s = 3.0
running_max_s = 5.0
failure_probability = 0.3
seed = 7
state_dir = "{state}"

[queues.main]
runner = "sim"

[queues.main.poll]
accepted_interval_s = 0.4
running_interval_s = 0.5
growth = 1.1
max_interval_s = 0.8
jitter = 0.2
"""


def sim(tmp_path, extra: str = "") -> str:
    return SIM.format(state=tmp_path / "sim") + extra


def assert_clean_finish(world, requests: list[str]) -> None:
    builds = world.builds()
    assert sorted(b.request_id for b in builds) == sorted(requests)
    assert all(b.status in ("SUCCEEDED", "FAILED", "CANCELLED") for b in builds)
    assert world.results_per_request() == {r: 1 for r in requests}
    polls = world.poll_numbers()
    for build in builds:
        # One chain per build: poll ids 1..n, nothing skipped, none forked, n = polls stored.
        assert polls[build.build_id] == list(range(1, build.polls + 1)), build


def test_many_sim_builds_poll_to_the_end_with_one_live_poll_each(daemon, world, tmp_path):
    d = daemon(sim(tmp_path)).start()
    requests = world.submit("main", 200)

    def sample() -> bool:
        world.check_one_live_poll()
        retried = world.rows("SELECT COUNT(*) AS n FROM queue_deliveries WHERE retry_count > 0")
        assert retried[0].n == 0
        return world.all_terminal(200)

    wait_until(sample, timeout=120, interval=0.05, message="200 builds terminal")
    assert_clean_finish(world, requests)
    builds = world.builds()
    assert sum(b.polls for b in builds) / len(builds) >= 3, "builds should take several polls"
    assert {b.status for b in builds} == {"SUCCEEDED", "FAILED"}
    events = d.events()
    triggered = Counter(e["request_id"] for e in events if e["event"] == "build_triggered")
    assert set(triggered.values()) == {1} and len(triggered) == 200
    assert not [e for e in events if e["event"] in ("delivery_nacked", "delivery_rejected")]
    assert d.stop() == 0


def test_noop_builds_finish_on_the_first_poll(daemon, world):
    daemon(noop_queue("fast")).start()
    requests = world.submit("fast", 20)
    wait_until(lambda: world.all_terminal(20), timeout=60)
    assert_clean_finish(world, requests)
    assert {(b.status, b.polls) for b in world.builds()} == {("SUCCEEDED", 1)}
    assert all(ns == [1] for ns in world.poll_numbers().values())


def test_kill_9_mid_flight_then_restart_finishes_everything_once(daemon, world, tmp_path):
    d = daemon(sim(tmp_path)).start()
    requests = world.submit("main", 60)
    wait_until(
        lambda: (
            len([b for b in world.builds() if b.build_id]) == 60
            and any(b.status == "RUNNING" for b in world.builds())
        ),
        timeout=60,
    )
    d.kill()
    unfinished = [b for b in world.builds() if b.status not in ("SUCCEEDED", "FAILED", "CANCELLED")]
    assert unfinished, "the kill should land while builds are still in flight"
    d.start()
    wait_until(lambda: (world.check_one_live_poll(), world.all_terminal(60))[1], timeout=120)
    assert_clean_finish(world, requests)
    triggered = Counter(e["request_id"] for e in d.events() if e["event"] == "build_triggered")
    assert set(triggered.values()) == {1}, "no request may be triggered twice"
    assert world.dead_letters(topics.BUILDSIGNAL_DLQ) == []


def test_sigterm_drains_without_counting_retries_and_a_restart_finishes(daemon, world, tmp_path):
    d = daemon(sim(tmp_path)).start()
    requests = world.submit("main", 80)
    wait_until(lambda: any(b.status == "RUNNING" for b in world.builds()), timeout=60)
    assert d.stop(timeout=30) == 0
    assert (
        world.rows(
            "SELECT COUNT(*) AS n FROM queue_deliveries WHERE inflight = 1 OR retry_count > 0"
        )[0].n
        == 0
    )
    assert world.rows("SELECT COUNT(*) AS n FROM queue_leases WHERE owner <> ''")[0].n == 0
    assert world.rows("SELECT COUNT(*) AS n FROM queue_subscribers")[0].n == 0
    d.start()
    wait_until(lambda: world.all_terminal(80), timeout=120)
    assert_clean_finish(world, requests)
    assert not [e for e in d.events() if e["event"] in ("delivery_nacked", "delivery_lost")]


def test_status_errors_back_off_then_dead_letter_into_failed_infra(daemon, world, tmp_path):
    fault = tmp_path / "fault"
    fault.touch()
    d = daemon(
        sim(tmp_path, extra="\n[runners.sim.faults]\n")
        .replace(
            f'state_dir = "{tmp_path / "sim"}"',
            f'state_dir = "{tmp_path / "sim"}"\nstatus_fault_file = "{fault}"',
        )
        .replace("\n[runners.sim.faults]\n", "")
    ).start()
    requests = world.submit("main", 2)
    wait_until(lambda: world.all_terminal(2), timeout=60)
    builds = world.builds()
    assert {(b.status, b.failure_reason) for b in builds} == {("FAILED", "infra")}
    assert all(
        "poll dead-lettered" in b.error and "simulated status failure" in b.error for b in builds
    )
    assert world.results_per_request() == {r: 1 for r in requests}
    dead = world.dead_letters(topics.BUILDSIGNAL_DLQ)
    assert len(dead) == 2 and {r.failure_count for r in dead} == {3}
    nacks = [
        e
        for e in d.events()
        if e["event"] == "delivery_nacked" and e.get("build_id") == builds[0].build_id
    ]
    assert [e["retry_count"] for e in nacks] == [0, 1, 2]
    times = [datetime.fromisoformat(e["timestamp"]) for e in nacks]
    first_gap, second_gap = (
        (times[1] - times[0]).total_seconds(),
        (times[2] - times[1]).total_seconds(),
    )
    assert first_gap >= 0.2 and second_gap > first_gap * 1.3, (first_gap, second_gap)


def test_deadline_cancels_the_build_and_records_a_timeout(daemon, world, tmp_path):
    from buildq.buildrunner.sim import SimConfig, SimRunner

    body = sim(tmp_path).replace("running_s = 3.0\nrunning_max_s = 5.0", "running_s = 60") + (
        "\n[queues.main.poll.__placeholder]\n" if False else ""
    )
    body = body.replace("jitter = 0.2\n", "jitter = 0.2\nfinish_by_s = 2.5\n")
    daemon(body).start()
    requests = world.submit("main", 3)
    wait_until(lambda: world.all_terminal(3), timeout=60)
    builds = world.builds()
    assert {(b.status, b.failure_reason) for b in builds} == {("FAILED", "timeout")}
    assert world.results_per_request() == {r: 1 for r in requests}
    runner = SimRunner(SimConfig(state_dir=tmp_path / "sim"))
    assert {runner.status(BuildID(b.build_id))[0].value for b in builds} == {"CANCELLED"}


def test_malformed_payloads_go_to_the_dlq_and_the_daemon_keeps_going(daemon, world, tmp_path):
    d = daemon(sim(tmp_path)).start()
    world.queue.publish(
        topics.BUILD, Message(id="bad/request", payload=b"{not json", partition_key="bad")
    )
    world.queue.publish(
        topics.BUILDSIGNAL, Message(id="x/poll/1", payload=b"[1,2]", partition_key="ghost")
    )
    world.queue.publish(
        topics.BUILDSIGNAL,
        Message(id="y/poll/1", payload=BuildID("never-stored").to_bytes(), partition_key="y"),
    )
    wait_until(
        lambda: (
            len(world.dead_letters(topics.BUILD_DLQ)) == 1
            and len(world.dead_letters(topics.BUILDSIGNAL_DLQ)) == 2
        ),
        timeout=30,
    )
    [bad_request] = world.dead_letters(topics.BUILD_DLQ)
    assert "not JSON" in bad_request.last_error
    reasons = sorted(r.last_error for r in world.dead_letters(topics.BUILDSIGNAL_DLQ))
    assert "BuildID payload must be a JSON object" in reasons[0] or "JSON object" in " ".join(
        reasons
    )
    assert any("unknown build 'never-stored'" in r for r in reasons)
    # The reconciler recorded the unparseable request as failed (infra), with a result.
    wait_until(lambda: any(b.request_id == "bad" for b in world.builds()), timeout=30)
    failed = next(b for b in world.builds() if b.request_id == "bad")
    assert (failed.status, failed.failure_reason) == ("FAILED", "infra")
    # ... and it keeps consuming.
    world.submit("main", 3, prefix="after")
    wait_until(lambda: world.all_terminal(4), timeout=60)
    assert d.process.poll() is None


def test_cancel_from_the_cli(daemon, world, tmp_path):
    body = sim(tmp_path).replace("running_s = 3.0\nrunning_max_s = 5.0", "running_s = 60")
    d = daemon(body).start()
    [request] = world.submit("main", 1)
    wait_until(lambda: world.builds() and world.builds()[0].status == "RUNNING", timeout=30)
    build_id = world.builds()[0].build_id
    done = subprocess.run(
        [BUILDQ, "cancel", build_id, "--config", str(d.config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    wait_until(lambda: world.all_terminal(1), timeout=30)
    [build] = world.builds()
    assert (build.status, build.failure_reason) == ("CANCELLED", "cancelled")
    assert world.results_per_request() == {request: 1}


@pytest.mark.parametrize("wait_flag", [True])
def test_submit_wait_exit_code_follows_the_result(daemon, world, tmp_path, wait_flag):
    body = sim(tmp_path).replace("failure_probability = 0.3", "failure_probability = 0.0")
    d = daemon(body).start()
    done = subprocess.run(
        [
            BUILDQ,
            "submit",
            "--config",
            str(d.config),
            "--queue",
            "main",
            "--head",
            "c1@abc",
            "--wait",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert '"status": "SUCCEEDED"' in done.stdout
    bad = subprocess.run(
        [BUILDQ, "submit", "--config", str(d.config), "--queue", "nope", "--head", "c1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 2 and "unknown queue 'nope'" in bad.stderr
    _ = signal
