"""The daemon against fake Buildkite and GitHub services: verdicts, secrets and webhooks.

Each test runs ``buildq run`` as a process whose ``[runners.ci]`` points at a fake CI service
on 127.0.0.1 (``tests/support/fakeci``), steers the fake's builds, and reads the outcome from the
database, the daemon's logs and the ``buildq`` CLI. The API token and the webhook secret are
canary values that must never show up in anything the daemon writes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator

import pytest

from tests.support.daemon import DaemonProcess, World
from tests.support.waiting import wait_until
from tests.system.e2e.ci_support import (
    FakeCI,
    PendingPoll,
    Receiver,
    all_stored_text,
    build,
    cli,
    cli_json,
    pending_polls,
    settled_poll,
    start_ci,
)

MakeDaemon = Callable[..., DaemonProcess]

#: Poll often without webhooks: the tests wait on the daemon, not the other way round.
BRISK_POLL = """
[queues.main]
runner = "ci"

[queues.main.poll]
accepted_interval_s = 0.2
running_interval_s = 0.2
growth = 1.0
max_interval_s = 0.2
jitter = 0.0
"""

#: Webhooks on: the first poll comes quickly, then the safety poll waits a minute.
WEBHOOKS = """
[webhooks]
enabled = true
port = 0
max_body_bytes = 16384

[queues.main]
runner = "ci"

[queues.main.poll]
accepted_interval_s = 0.2
running_interval_s = 0.05
max_interval_s = 0.05
growth = 1.0
jitter = 0.0
webhook_safety_interval_s = {safety_s}
"""

#: How far out a pending poll is once the 60 s safety poll (no jitter) is scheduled.
SAFETY_MS = 50_000

# One vendor gets the database matrix; the other runs on SQLite, to keep the file short.
VENDOR_MATRIX = pytest.mark.parametrize(
    ("kind", "backend_url"),
    [
        ("buildkite", "sqlite"),
        pytest.param("buildkite", "mysql", marks=pytest.mark.mysql),
        ("github", "sqlite"),
    ],
    indirect=["backend_url"],
)


@pytest.fixture(params=["buildkite", "github"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def ci(kind: str) -> Iterator[FakeCI]:
    fake = start_ci(kind)
    yield fake
    fake.stop()


def wait_polled(world: World, request_id: str, polls: int, status: str) -> None:
    """Until the build has been polled ``polls`` times and last seen in ``status``."""

    def polled() -> bool:
        world.check_one_live_poll()
        rows = world.rows("SELECT status, polls FROM builds WHERE request_id = :r", r=request_id)
        return bool(rows) and rows[0].polls >= polls and rows[0].status == status

    wait_until(polled, timeout=20, interval=0.05, message=f"{request_id} polled as {status}")


def wait_settled(world: World, build_id: str) -> PendingPoll:
    """Until the build's one poll waits for the safety interval, not in flight; that poll."""
    pending = wait_until(lambda: settled_poll(world, build_id, SAFETY_MS), timeout=10)
    assert pending is not None
    return pending


def webhooked_build(
    ci: FakeCI, daemon: MakeDaemon, world: World, extra_config: str = ""
) -> tuple[DaemonProcess, Receiver, str, str, PendingPoll]:
    """A daemon with webhooks on and one build waiting on its safety poll: the daemon, its
    receiver, the request id, the build id and the pending poll."""
    config = ci.runner_toml(webhooks=True) + WEBHOOKS.format(safety_s=60) + extra_config
    d = daemon(config, env=ci.env()).start()
    receiver = Receiver.of(d)
    [request] = world.submit("main", 1)
    wait_polled(world, request, 1, "ACCEPTED")
    build_id = build(world, request).build_id
    return d, receiver, request, build_id, wait_settled(world, build_id)


def wait_terminal(world: World, expected: int, timeout: float = 30) -> None:
    def done() -> bool:
        world.check_one_live_poll()
        return world.all_terminal(expected)

    wait_until(done, timeout=timeout, interval=0.05, message=f"{expected} builds terminal")


def assert_one_chain_each(world: World) -> None:
    """One result per request; per triggered build one poll chain, ids 1..n with n = polls."""
    builds = world.builds()
    assert world.results_per_request() == {b.request_id: 1 for b in builds}
    chains = world.poll_numbers()
    for row in builds:
        if row.build_id is not None:
            assert chains[row.build_id] == list(range(1, row.polls + 1)), row


def assert_nowhere(secrets: list[str], daemon: DaemonProcess, world: World, show: str) -> None:
    """The secrets are nowhere the daemon writes: logs, the database, the CLI's JSON.

    ``builds ls --json`` prints every build as ``show`` does; one ``show`` (of ``show``) checks
    that path without a CLI start per build.
    """
    logs = "".join(p.read_text(errors="replace") for p in daemon.log_dir.glob("daemon-*.log"))
    stored = all_stored_text(world)
    listed = cli(daemon.config, "builds", "ls", "--json").stdout
    shown = cli(daemon.config, "builds", "show", show, "--json").stdout
    assert logs and stored and listed and shown
    for secret in secrets:
        for where, text in (("logs", logs), ("db", stored), ("ls", listed), ("show", shown)):
            assert secret not in text, f"secret found in {where}"


# --- 1. builds run to their verdicts ------------------------------------------------------


def test_builds_reach_the_fakes_verdicts_and_the_token_stays_secret(
    ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d = daemon(ci.runner_toml() + BRISK_POLL, env=ci.env()).start()
    # The vendor's error bodies quote the token: a retried 502 on a read ...
    ci.fail_next_status(f"upstream error for credential {ci.token}")
    passes, fails, cancels = world.submit("main", 3)

    wait_until(lambda: len(ci.build_ids()) == 3, timeout=20, message="3 builds triggered")
    ids = ci.build_ids()
    for request_id in (passes, fails, cancels):
        wait_polled(world, request_id, 1, "ACCEPTED")
        assert build(world, request_id).build_id == ids[request_id]
    # ... and a refused create, whose message ends up in the stored error.
    ci.refuse_next_create(f"token {ci.token} may not create builds")
    [refused] = world.submit("main", 1, prefix="refused")

    for request_id in (passes, fails, cancels):
        ci.set_running(ids[request_id])
    for request_id in (passes, fails, cancels):
        wait_polled(world, request_id, 2, "RUNNING")
    ci.finish(ids[passes], passed=True)
    ci.finish(ids[fails], passed=False)
    cli(d.config, "cancel", ids[cancels])
    wait_terminal(world, 4)

    outcomes = {r.request_id: (r.status, r.failure_reason, r.build_id) for r in world.builds()}
    assert outcomes == {
        passes: ("SUCCEEDED", None, ids[passes]),
        fails: ("FAILED", "verdict", ids[fails]),
        cancels: ("CANCELLED", "cancelled", ids[cancels]),
        refused: ("FAILED", "infra", None),
    }
    assert_one_chain_each(world)
    shown = cli_json(d.config, "builds", "show", passes)
    assert shown["metadata"]["native_state"] in ("passed", "completed")
    assert shown["metadata"]["url"].startswith(ci.fake.url)
    error = build(world, refused).error
    assert "422" in error and "<redacted>" in error, error
    assert len(ci.cancel_requests()) == 1

    events = d.events()
    assert [e for e in events if e["event"] == "runner_request_retry"], "the 502 was retried"
    assert not [e for e in events if e["event"] in ("delivery_nacked", "build_status_unknown")]
    assert {r.status for r in ci.fake.requests} - {200, 201, 202, 204, 304, 422, 502} == set()
    assert_nowhere([ci.token], d, world, show=refused)
    assert d.stop() == 0


# --- 2. webhooks: the fast path and what is refused ------------------------------------------


@VENDOR_MATRIX
def test_a_signed_webhook_polls_the_build_now_through_its_one_pending_poll(
    ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d, receiver, request, build_id, waiting = webhooked_build(ci, daemon, world)
    assert waiting.message_id.endswith("/poll/2")
    reads = len(ci.status_requests(build_id))

    # Refused or ignored deliveries change nothing: same pending poll, same due time.
    refused = [receiver.post(ci.forged_delivery(build_id))]
    if ci.kind == "buildkite":
        refused.append(receiver.post(ci.signed_delivery(build_id, stale=True)))
    refused.append(receiver.post(ci.oversize_delivery(build_id, 20_000)))
    assert [r.status_code for r in refused] == [401] * (len(refused) - 1) + [413]
    foreign = receiver.post(ci.signed_delivery(ci.foreign_build()))
    assert 200 <= foreign.status_code < 300
    assert pending_polls(world, build_id) == [waiting]
    assert len(ci.status_requests(build_id)) == reads
    assert build(world, request).polls == 1

    # A wake while the delayed poll is pending: that poll runs now; still one chain.
    ci.set_running(build_id)
    woke_at = time.monotonic()
    for _ in range(3):  # vendors deliver more than once; each only expedites what is pending
        assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    wait_polled(world, request, 2, "RUNNING")
    assert time.monotonic() - woke_at < 15, "a webhook must not wait for the safety poll"
    pending = wait_settled(world, build_id)
    running = build(world, request)
    assert running.status == "RUNNING" and 2 <= running.polls <= 4
    assert pending.message_id.endswith(f"/poll/{running.polls + 1}")
    assert world.poll_numbers()[build_id] == list(range(1, running.polls + 2))

    # The build finishes; one signed delivery and it is recorded within seconds.
    ci.finish(build_id, passed=True)
    finished_at = time.monotonic()
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    wait_terminal(world, 1, timeout=15)
    assert time.monotonic() - finished_at < 15
    assert build(world, request).status == "SUCCEEDED"
    assert_one_chain_each(world)
    assert pending_polls(world, build_id) == []

    # A late delivery for a finished build is ignored.
    polls = world.poll_numbers()
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    assert world.poll_numbers() == polls

    events = d.events()
    reasons = {e.get("reason") for e in events if e["event"] == "webhook_rejected"}
    assert reasons == {"bad_signature", "too_large"} | (
        {"stale_timestamp"} if ci.kind == "buildkite" else set()
    )
    ignored = {e["build_id"] for e in events if e["event"] == "webhook_event_ignored"}
    assert ignored == {ci.foreign_build_ids[-1], build_id}
    assert_nowhere([ci.token, ci.secret], d, world, show=request)
    assert d.stop() == 0


# --- 3. webhooks on, none arrives: the safety poll still finishes the build ---------------


@VENDOR_MATRIX
def test_without_deliveries_the_safety_poll_finishes_the_build_at_its_own_cadence(
    ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d = daemon(ci.runner_toml(webhooks=True) + WEBHOOKS.format(safety_s=1.0), env=ci.env()).start()
    [request] = world.submit("main", 1)
    wait_until(lambda: request in ci.build_ids(), timeout=20, message="build triggered")
    build_id = ci.build_ids()[request]
    ci.set_running(build_id)
    wait_polled(world, request, 4, "RUNNING")
    ci.finish(build_id, passed=False)
    wait_terminal(world, 1, timeout=15)

    assert (build(world, request).status, build(world, request).failure_reason) == (
        "FAILED",
        "verdict",
    )
    assert_one_chain_each(world)
    reads = ci.status_requests(build_id)
    # running_interval_s = 0.05 would have polled ~20 times a second; the safety poll once.
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert len(gaps) >= 4 and min(gaps) >= 0.5, gaps
    assert not [e for e in d.events() if e["event"].startswith("webhook_event")]
    assert d.stop() == 0


# --- 4. a delivery that lands while the build's poll is in flight ---------------------------


@pytest.mark.parametrize(
    ("kind", "backend_url"), [("buildkite", "sqlite")], indirect=["backend_url"]
)
def test_a_delivery_during_an_in_flight_poll_is_not_lost(
    ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d, receiver, request, build_id, _ = webhooked_build(ci, daemon, world)

    # The "running" delivery wakes poll 2, whose status read sees "running" and then hangs ...
    ci.set_running(build_id)
    ci.slow_next_status(2.0)
    reads = len(ci.status_requests(build_id))
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    wait_until(lambda: len(ci.status_requests(build_id)) > reads, timeout=10)
    # ... while the build finishes and says so.
    ci.finish(build_id, passed=True)
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    woken = [e for e in d.events() if e["event"] == "webhook_event"]
    assert [e["expedited"] for e in woken] == [1, 0], "the second wake found the poll in flight"

    # The build must still be recorded within seconds, not after the 60 s safety poll.
    wait_terminal(world, 1, timeout=8)
    assert build(world, request).status == "SUCCEEDED"
    assert_one_chain_each(world)


#: The buildsignal claim outlives this test: a re-wake that only stopped at its visibility
#: timeout would still be trying when the test ends.
LONG_POLL_CLAIM = """
[consumer.topics.buildsignal]
visibility_timeout_ms = 120000
"""


@pytest.mark.parametrize(
    ("kind", "backend_url"), [("buildkite", "sqlite")], indirect=["backend_url"]
)
def test_a_wake_during_the_last_poll_stops_once_the_build_is_finished(
    ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d, receiver, _, build_id, _ = webhooked_build(ci, daemon, world, LONG_POLL_CLAIM)

    # The build finishes; the first wake's poll reads that slowly, and a second wake arrives
    # while it is in flight. That poll is the last: no next poll will ever exist to wake.
    ci.finish(build_id, passed=True)
    ci.slow_next_status(2.0)
    reads = len(ci.status_requests(build_id))
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    wait_until(lambda: len(ci.status_requests(build_id)) > reads, timeout=10)
    assert receiver.post(ci.signed_delivery(build_id)).status_code == 202
    wait_terminal(world, 1, timeout=8)

    # The re-wake stops as soon as the build is finished, not after the claim's visibility
    # timeout of expedite attempts every 0.1 s.
    def rewakes() -> list[dict[str, object]]:
        return [
            e for e in d.events() if e["event"] == "webhook_rewake" and e["build_id"] == build_id
        ]

    wait_until(lambda: len(rewakes()) == 1, timeout=20)
    assert rewakes()[0]["expedited"] == 0
