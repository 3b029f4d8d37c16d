"""A running daemon fed hostile messages: each is processed or dead-lettered with a reason,
the reconcilers clear every dead letter, and the daemon keeps consuming.

One daemon process per backend serves the whole module; every hypothesis example publishes
one message and waits until the daemon is done with it.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildq.buildrunner import BuildID, MalformedPayload
from buildq.migrations import upgrade
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.queue.contract import Message, dlq_topic
from tests.support.daemon import DaemonProcess, World, noop_queue, write_config
from tests.support.database import BACKENDS, clean_tables
from tests.support.strategies import NASTY, encode, json_values, mutated, raw_bytes
from tests.support.waiting import wait_until

EXAMPLES = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

RUNNERS = noop_queue("main")

#: Strings a database stores as given (valid Unicode).
storable_text = st.sampled_from([s for s in NASTY if s not in ("\ud800", "\udcff")]) | st.text(
    st.characters(exclude_categories=["Cs"]), max_size=40
)


@dataclass
class Target:
    world: World
    daemon: DaemonProcess
    ids: Iterator[int]


@pytest.fixture(scope="module", params=BACKENDS)
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    tmp = tmp_path_factory.mktemp(f"fuzz-daemon-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{tmp / 'buildq.db'}"
        upgrade(url)
    else:
        url = request.getfixturevalue("mysql_test_url")
        clean_tables(url)
    daemon = DaemonProcess(write_config(tmp / "config", url, RUNNERS), tmp)
    daemon.start()
    world = World(url)
    yield Target(world, daemon, itertools.count())
    try:
        check_daemon_after(world, daemon)
    finally:
        world.close()
        daemon.cleanup()


def check_daemon_after(world: World, daemon: DaemonProcess) -> None:
    """Still consuming; every dead letter reconciled; no unclassified failure."""
    [request_id] = world.submit("main", 1, prefix="after-fuzz")
    wait_until(
        lambda: world.rows(
            "SELECT status FROM builds WHERE request_id = :r AND status = 'SUCCEEDED'", r=request_id
        ),
        timeout=60,
        message="a build after the fuzzing",
    )
    assert daemon.process.poll() is None
    events = daemon.events()
    unexpected = [e for e in events if e.get("event") == "handler_failed"]
    assert not unexpected, unexpected[:3]
    assert daemon.stop() == 0


def settle(world: World, topic: str, message: Message) -> Any:
    """Wait until the daemon is done with ``message`` (and with its dead letter, if any)."""

    def done() -> Any:
        rows = world.rows(
            "SELECT m.topic, m.last_error, COUNT(d.seq) AS live FROM queue_messages m"
            " LEFT JOIN queue_deliveries d ON d.seq = m.seq"
            " WHERE m.topic IN (:t, :dlq) AND m.partition_key = :k AND m.message_id = :i"
            " GROUP BY m.seq, m.topic, m.last_error",
            t=topic,
            dlq=dlq_topic(topic),
            k=message.partition_key,
            i=message.id,
        )
        return rows if rows and all(r.live == 0 for r in rows) else None

    rows = wait_until(done, timeout=30, interval=0.02, message=f"{message.id!r} settled")
    dead = [r for r in rows if r.topic == dlq_topic(topic)]
    for letter in dead:
        assert letter.last_error, "a dead letter says why"
    return dead


def publish(target: Target, topic: str, payload: bytes, key: str, meta: dict[str, str]) -> Message:
    n = next(target.ids)
    message = Message(
        id=f"fuzz/{topic}/{n}", payload=payload, partition_key=key[:180] + f"#{n}", metadata=meta
    )
    target.world.queue.publish(topic, message)
    return message


@EXAMPLES
@given(
    payload=raw_bytes
    | mutated(
        {"request_id": "r", "queue": "main", "head": [{"id": "c"}], "base": []},
        ["request_id", "queue", "head", "base", "metadata"],
    ).map(encode),
    key=storable_text,
    meta=st.dictionaries(storable_text, storable_text, max_size=3),
)
def test_build_topic(target: Target, payload: bytes, key: str, meta: dict[str, str]) -> None:
    message = publish(target, topics.BUILD, payload, key, meta)
    dead = settle(target.world, topics.BUILD, message)
    if dead:
        # The reconciler recorded the request as failed (infra): nothing hangs unseen.
        request_id = _request_id(payload) or message.partition_key
        rows = target.world.rows(
            "SELECT status, failure_reason FROM builds WHERE request_id = :r", r=request_id
        )
        assert [tuple(r) for r in rows] in ([("FAILED", "infra")], [("SUCCEEDED", None)]), rows
    assert target.daemon.process.poll() is None


def _request_id(payload: bytes) -> str | None:
    """The request id the reconciler records a dead request under (the message's key if the
    payload cannot be read as a request)."""
    try:
        return BuildRequest.from_bytes(payload).request_id
    except MalformedPayload:
        return None


@EXAMPLES
@given(
    payload=raw_bytes | json_values.map(lambda v: encode({"id": v})),
    key=storable_text,
)
def test_buildsignal_topic(target: Target, payload: bytes, key: str) -> None:
    """A poll for a build that was never stored goes to the DLQ with the reason."""
    message = publish(target, topics.BUILDSIGNAL, payload, key, {})
    dead = settle(target.world, topics.BUILDSIGNAL, message)
    assert len(dead) == 1, "no such build: the poll cannot be processed"
    assert target.daemon.process.poll() is None


@EXAMPLES
@given(
    request_id=storable_text.filter(lambda s: 0 < len(s) <= 150),
    meta=st.dictionaries(storable_text, storable_text, max_size=3),
    change=storable_text.filter(lambda s: 0 < len(s) <= 500 and "@" not in s),
)
def test_hostile_but_valid_requests_are_stored_verbatim(
    target: Target, request_id: str, meta: dict[str, str], change: str
) -> None:
    n = next(target.ids)
    request_id = f"{request_id}#{n}"
    body = {"request_id": request_id, "queue": "main", "head": [{"id": change}], "metadata": meta}
    message = Message(id=f"{request_id}/request", payload=encode(body), partition_key=request_id)
    target.world.queue.publish(topics.BUILD, message)
    assert settle(target.world, topics.BUILD, message) == []
    [row] = target.world.rows("SELECT * FROM builds WHERE request_id = :r", r=request_id)
    assert json.loads(row.request_metadata) == meta
    assert json.loads(row.changes)["head"][0]["id"] == change


def test_a_poll_of_a_build_never_stored_is_dead_lettered_with_the_reason(target: Target) -> None:
    n = next(target.ids)
    ghost = f"sim-1-1-1-p-{n:016x}"
    message = Message(id=f"{ghost}/poll/1", payload=BuildID(ghost).to_bytes(), partition_key=ghost)
    target.world.queue.publish(topics.BUILDSIGNAL, message)
    [dead] = settle(target.world, topics.BUILDSIGNAL, message)
    assert f"unknown build '{ghost}': no such build was stored" in dead.last_error
    assert target.world.rows("SELECT 1 FROM builds WHERE build_id = :b", b=ghost) == []


def test_a_poll_of_a_finished_build_is_acked_and_changes_nothing(target: Target) -> None:
    [request_id] = target.world.submit("main", 1, prefix=f"finished-{next(target.ids)}")
    wait_until(
        lambda: target.world.rows(
            "SELECT 1 FROM builds WHERE request_id = :r AND status = 'SUCCEEDED'", r=request_id
        ),
        timeout=30,
    )
    [before] = target.world.rows("SELECT * FROM builds WHERE request_id = :r", r=request_id)
    stale = Message(
        id=f"{before.build_id}/poll/99",
        payload=BuildID(before.build_id).to_bytes(),
        partition_key=before.build_id,
    )
    target.world.queue.publish(topics.BUILDSIGNAL, stale)
    assert settle(target.world, topics.BUILDSIGNAL, stale) == []
    [after] = target.world.rows("SELECT * FROM builds WHERE request_id = :r", r=request_id)
    assert tuple(after) == tuple(before)
    assert target.world.results_per_request()[request_id] == 1
