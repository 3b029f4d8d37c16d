"""Regression tests for what the chaos run found, each small enough to run anywhere.

- A second trigger of one request (its daemon SIGKILLed between ``trigger`` and recording the
  build, or its claim timed out while it waited in a busy daemon's memory) started a second
  ``sim`` build: the sim ignored the correlation key. It now returns the first build, across
  runner instances sharing ``state_dir`` as across restarts.
- A row whose metadata a database client wrote around buildq (not UTF-8) made every fetch of
  its subscription fail: the healthy messages claimed with it burned their retries into the
  DLQ, and the DLQ's reconciler then stalled on it the same way.

Found by the full-disk phase, and fixed:

- A daemon started while the database refuses writes answered /readyz 200 "ready" while it
  waited to join its consumer groups, consuming nothing; it is 503 "starting" until it joined.
- If the refusal outlasted the write retry budget (30 s), ``buildq run`` exited 1 with a
  traceback; it waits now, as it waits for a database it cannot reach.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from buildq.buildrunner import CORRELATION_KEY, Change
from buildq.buildrunner.sim import SimConfig, SimRunner
from buildq.migrations import upgrade
from buildq.orchestrator import topics
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.messages import METADATA_ERROR_KEY, decode_metadata
from buildq.storage.database import Database
from tests.support.daemon import DaemonProcess, World, write_config
from tests.support.waiting import wait_until
from tests.system.chaos.cluster import Node

NOOP = '[runners.noop]\ntype = "noop"\n[queues.main]\nrunner = "noop"\n'


@pytest.mark.parametrize("state_dir", [True, False], ids=["state-dir", "memory"])
def test_a_retried_sim_trigger_returns_the_first_build(tmp_path: Path, state_dir: bool) -> None:
    config = SimConfig(state_dir=tmp_path / "sim" if state_dir else None)
    runner = SimRunner(config)
    first = runner.trigger("q", [], [Change("c")], {CORRELATION_KEY: "req-1", "n": "1"})
    assert runner.trigger("q", [], [Change("c")], {CORRELATION_KEY: "req-1"}) == first
    assert runner.trigger("q", [], [Change("c")], {CORRELATION_KEY: "req-2"}) != first
    assert runner.trigger("q", [], [Change("c")], {}) != runner.trigger("q", [], [Change("c")])
    if state_dir:  # a restarted daemon, or another replica sharing the directory
        assert (
            SimRunner(config).trigger("q", [], [Change("c")], {CORRELATION_KEY: "req-1"}) == first
        )


def test_racing_sim_triggers_of_one_request_agree(tmp_path: Path) -> None:
    config = SimConfig(state_dir=tmp_path / "sim")
    runners = [SimRunner(config) for _ in range(8)]
    got: list[str] = []
    barrier = threading.Barrier(len(runners))

    def trigger(runner: SimRunner) -> None:
        barrier.wait()
        got.append(runner.trigger("q", [], [Change("c")], {CORRELATION_KEY: "race"}).id)

    threads = [threading.Thread(target=trigger, args=(r,)) for r in runners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(got)) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"k": "v"}', {"k": "v"}),
        (b'{"k": "v"}', {"k": "v"}),
        (None, {}),
        (b'{"k": "\xff"}', {"k": "\ufffd"}),
        ("not json", {METADATA_ERROR_KEY: "the stored metadata is not JSON"}),
        ("[1]", {METADATA_ERROR_KEY: "the stored metadata is not a JSON object"}),
        ('{"n": 1}', {"n": "1"}),
    ],
)
def test_stored_metadata_always_decodes(raw: object, expected: dict[str, str]) -> None:
    assert decode_metadata(raw) == expected


def test_a_row_written_around_buildq_does_not_stall_its_subscription(tmp_path: Path) -> None:
    """SQLite keeps whatever bytes a client stores; buildq must keep consuming past them."""
    url = f"sqlite:///{tmp_path / 'buildq.db'}"
    upgrade(url)
    config = write_config(
        tmp_path / "config", url, NOOP + "[queues.main.poll]\naccepted_interval_s = 0.05\n"
    )
    daemon = DaemonProcess(config, tmp_path).start()
    world = World(url)
    try:
        poison_seq = _insert_raw_message(world.db, topics.BUILD, "poison", b'{"k": "\xff"}')
        healthy = world.submit("main", 5, prefix="healthy")
        wait_until(lambda: world.all_terminal(6), timeout=60, message="all requests finished")
        statuses = {b.request_id: (b.status, b.failure_reason) for b in world.builds()}
        assert statuses == {
            **{r: ("SUCCEEDED", None) for r in healthy},
            "poison": ("FAILED", "infra"),
        }
        [dead] = world.dead_letters(topics.BUILD_DLQ)
        assert dead.partition_key == "poison" and "request_id" in dead.last_error
        assert not [e for e in daemon.events() if e.get("event") == "fetch_failed"]
        inspected = SqlQueue(world.db).store.fetch_by_offset(topics.BUILD, "poison", 0, 2**62)
        assert [m.message.metadata for m in inspected] == [{"k": "\ufffd"}]
        assert poison_seq == inspected[0].offset
        assert daemon.stop() == 0
    finally:
        world.close()
        daemon.cleanup()


def _insert_raw_message(db: Database, topic: str, key: str, metadata: bytes) -> int:
    """A message row as a client other than buildq might write it (metadata as raw bytes)."""

    def insert(conn: sa.Connection) -> int:
        conn.execute(
            sa.text(
                "INSERT INTO queue_messages (topic, partition_key, message_id, dlq_group,"
                " partition_hash, payload, metadata, visible_after, created_at, publish_token)"
                " VALUES (:t, :k, :i, '', 0, :p, :m, 0, 0, 1)"
            ),
            {"t": topic, "k": key, "i": f"{key}/request", "p": b"{}", "m": metadata},
        )
        seq = int(conn.execute(sa.text("SELECT MAX(seq) FROM queue_messages")).scalar_one())
        conn.execute(
            sa.text(
                "INSERT INTO queue_deliveries (seq, grp, topic, slot, visible_at)"
                " VALUES (:s, :g, :t, 0, 0)"
            ),
            {"s": seq, "g": topics.GROUP, "t": topic},
        )
        return seq

    return db.write(insert)


def _started_on_a_full_disk(tmp_path: Path) -> Node:
    """A daemon (SQLite, through the shim of tests/support/shims) whose every write is refused as on
    a full disk from before it starts."""
    url = f"sqlite:///{tmp_path / 'buildq.db'}"
    upgrade(url)
    node = Node("node0", write_config(tmp_path / "config", url, NOOP), tmp_path)
    node.disk_full_file.touch()
    node.spawn()
    return node


def _happens_within(timeout_s: float, condition: Callable[[], bool]) -> bool:
    """Whether ``condition`` comes true within ``timeout_s`` (watching for something that must
    not happen)."""
    try:
        wait_until(condition, timeout=timeout_s, interval=0.1)
    except AssertionError:
        return False
    return True


def test_readyz_is_red_while_a_starting_daemon_cannot_join_its_groups(tmp_path: Path) -> None:
    node = _started_on_a_full_disk(tmp_path)
    try:
        wait_until(lambda: node.readyz() is not None, timeout=30, message="/readyz answers")
        # readyz first, then the log: not ready after the answer means not ready at it.
        green = _happens_within(8.0, lambda: node.readyz() == 200 and not node.ready())
        assert not green, "/readyz said ready while the daemon consumed nothing"
        node.disk_full_file.unlink()
        wait_until(lambda: node.ready() and node.readyz() == 200, timeout=60, message="ready")
        assert node.stop() == 0
    finally:
        node.cleanup()


@pytest.mark.slow
def test_a_daemon_started_on_a_full_disk_waits_for_space(tmp_path: Path) -> None:
    node = _started_on_a_full_disk(tmp_path)
    try:
        # Past every write's retry budget: an operator may take minutes to free space.
        exited = _happens_within(40.0, lambda: not node.alive())
        node.reap()
        assert not exited, f"exited {node.current.exit_code}: {node.current.log.read_text()[-600:]}"
        node.disk_full_file.unlink()
        wait_until(node.ready, timeout=60, message="ready once there is space")
        assert node.stop() == 0
    finally:
        node.cleanup()
