"""``buildq.builds``: what the CLI, the demo and the status page submit and cancel through."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection

from buildq.buildrunner import BuildStatus, Change
from buildq.builds import Builds, CancelOutcome, InvalidRequest, new_request
from buildq.orchestrator import topics
from buildq.orchestrator.sqlbatch import SqlBuildBatch
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.messages import MessageStore
from buildq.storage.database import Database


def _trigger(db: Database, request_id: str, build_id: str) -> None:
    request = new_request("main", ["c1@r1"], request_id=request_id)
    db.write(
        lambda conn: SqlBuildBatch(conn, 1_000, immediate=True).insert_triggered(
            request, build_id, "sim"
        )
    )


def _fail(db: Database, request_id: str) -> None:
    def write(conn: Connection) -> None:
        batch = SqlBuildBatch(conn, 2_000, immediate=True)
        batch.fail_request(None, request_id, "boom")
        batch.flush()

    db.write(write)


def test_a_request_checks_what_the_daemon_checks() -> None:
    request = new_request("main", ["c2@b", Change("c3")], ["main@HEAD"], metadata={"k": "v"})
    assert request.request_id.startswith("req-")
    assert [c.id for c in request.head] == ["c2", "c3"] and request.base[0].revision == "HEAD"

    with pytest.raises(InvalidRequest) as bad_change:
        new_request("main", ["@nothing"])
    assert bad_change.value.field == "head" and str(bad_change.value).startswith("head: ")
    with pytest.raises(InvalidRequest, match="at least one change in 'head'"):
        new_request("main", [])
    with pytest.raises(InvalidRequest, match="'request_id' must be a string"):
        new_request("main", ["c1"], request_id="")
    with pytest.raises(InvalidRequest, match=r"unknown queue 'nope' \(configured: main, slow\)"):
        new_request("nope", ["c1"], queues={"main", "slow"})


def test_submit_is_idempotent_on_the_request_id(db: Database) -> None:
    builds = Builds(db, queues={"main"})
    request = new_request("main", ["c1@r1"], request_id="r-1")

    first, again = builds.submit(request), builds.submit(request)

    assert (first.request_id, first.duplicate, again.duplicate) == ("r-1", False, True)
    assert len(QueueAdmin(db, MessageStore(db)).messages(topics.BUILD)) == 1
    with pytest.raises(InvalidRequest, match="unknown queue"):
        builds.submit(new_request("slow", ["c1"]))


def test_cancel_says_what_came_of_it(db: Database) -> None:
    builds = Builds(db)
    _trigger(db, "r-live", "b-live")
    _trigger(db, "r-done", "b-done")
    _fail(db, "r-done")

    assert builds.cancel("nothing").outcome is CancelOutcome.NOT_FOUND
    done = builds.cancel("r-done")
    assert done.outcome is CancelOutcome.ALREADY_FINISHED and done.build is not None
    assert done.build.status == BuildStatus.FAILED.value
    live = builds.cancel("r-live")
    assert live.outcome is CancelOutcome.REQUESTED and live.build is not None
    assert live.build.build_id == "b-live"
    after = builds.get("b-live")
    assert after is not None and after.cancel_requested_at_ms is not None


def test_get_list_and_follow(db: Database) -> None:
    builds = Builds(db)
    _trigger(db, "r-1", "b-1")
    _trigger(db, "r-2", "b-2")
    _fail(db, "r-2")

    got = builds.get("r-1")
    assert got is not None and got.build_id == "b-1" and builds.get("b-1") == got
    assert {b.request_id for b in builds.list()} == {"r-1", "r-2"}
    assert [b.request_id for b in builds.list([BuildStatus.FAILED.value])] == ["r-2"]
    assert builds.list(queue="other") == []
    assert [b.status for b in builds.follow("r-2")] == [BuildStatus.FAILED.value]
    with pytest.raises(TimeoutError, match="gave up waiting for r-1 after 0s"):
        list(builds.follow("r-1", timeout_s=0, interval_s=0))


def test_open_owns_its_connection(backend_url: str) -> None:
    with Builds.open(backend_url) as builds:
        assert builds.submit(new_request("main", ["c1"], request_id="r-1")).duplicate is False
        assert builds.get("r-1") is None  # requested, not yet triggered by a daemon
