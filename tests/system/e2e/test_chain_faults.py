"""A build's poll chain against what is not its own (issue 14, items 4 and 5), the daemon as a
process on both backends:

- a request replayed after retention purged its first messages resumes the live chain (it
  publishes the build's next poll number, which the live poll already has) instead of starting
  a second one at poll 1;
- a stray, malformed message keyed on a live build is dead-lettered, and the dead-letter
  reconciler leaves the build alone: it is not the build's chain.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from buildq.orchestrator import topics
from buildq.queue.contract import Message
from buildq.queue.sql.retention import Retention
from buildq.storage.database import Database, create_engine
from tests.support.daemon import DaemonProcess, World
from tests.support.waiting import wait_until

POLLS = 40
SCRIPTED = f"""
[runners.sim]
type = "sim"
accepted_s = 0.0
running_s = 0.0
failure_probability = 0.0
polls = {POLLS}

[poll]
accepted_interval_s = 0.1
running_interval_s = 0.1
growth = 1.0
jitter = 0.0

[queues.main]
runner = "sim"
"""


def polled(world: World, at_least: int) -> bool:
    rows = world.rows("SELECT MIN(polls) AS n FROM builds")
    return bool(rows) and (rows[0].n or 0) >= at_least


def test_a_replay_after_retention_resumes_the_live_chain(
    daemon: Callable[..., DaemonProcess], world: World, backend_url: str
) -> None:
    d = daemon(SCRIPTED).start()
    requests = world.submit("main", 5)
    wait_until(lambda: polled(world, 5), timeout=60, message="builds polled a few times")
    # Retention 0: every message all groups are done with goes, the requests and the first
    # polls included, so publishing a request again is not deduplicated any more.
    db = Database(create_engine(backend_url, pool_size=2))
    try:
        assert Retention(db, retention_ms=0).purge().deleted > 0
    finally:
        db.dispose()
    before = {b.request_id: b.polls for b in world.builds()}
    assert world.submit("main", 5) == requests  # the same requests, replayed
    wait_until(lambda: world.all_terminal(len(requests)), timeout=120, message="finished")
    assert {(b.status, b.polls) for b in world.builds()} == {("SUCCEEDED", POLLS)}
    for build in world.builds():
        numbers = world.poll_numbers()[build.build_id]
        # One chain: the numbers that are left go up by one, none repeats, none starts over.
        assert numbers == list(range(numbers[0], POLLS + 1)), numbers
        assert numbers[0] > 1 and before[build.request_id] >= 5
    assert world.results_per_request() == {r: 1 for r in requests}
    assert d.stop() == 0


def test_a_stray_letter_keyed_on_a_live_build_leaves_it_running(
    daemon: Callable[..., DaemonProcess], world: World, tmp_path: Path
) -> None:
    d = daemon(SCRIPTED).start()
    [request] = world.submit("main", 1)
    wait_until(lambda: polled(world, 2), timeout=60, message="the build polled")
    [build] = world.builds()
    # A typo'd `buildq queue publish`: not a poll of the chain, and not readable.
    world.queue.publish(
        topics.BUILDSIGNAL,
        Message(id="oops", payload=b"{not json", partition_key=build.build_id),
    )
    wait_until(lambda: world.dead_letters(topics.BUILDSIGNAL_DLQ), timeout=30, message="dlq'd")
    wait_until(lambda: world.all_terminal(1), timeout=60, message="finished")
    [done] = world.builds()
    assert (done.status, done.failure_reason, done.polls) == ("SUCCEEDED", None, POLLS)
    assert world.results_per_request() == {request: 1}
    events = [e for e in d.events() if e["event"] == "dead_letter_not_of_chain"]
    assert events and events[0]["build_id"] == build.build_id
    assert not [e for e in d.events() if e["event"] == "build_failed_infra"]
    assert d.stop() == 0
