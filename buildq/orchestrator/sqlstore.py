"""The build store on SQL: the ``builds`` table, read and written with SQLAlchemy Core."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection

from buildq.buildrunner import BuildStatus, Change
from buildq.db import Database
from buildq.orchestrator.model import Build, BuildRequest
from buildq.orchestrator.schema import builds as b
from buildq.queue.sql.dialect import db_now_ms, insert_ignore

NOW = db_now_ms()
TERMINAL = [s.value for s in BuildStatus if s.is_terminal]
_ERROR_MAX = 10_000

_insert_build = insert_ignore(b)
_not_terminal = b.c.status.not_in(TERMINAL)
#: Statuses of builds still in flight (the rest are TERMINAL).
LIVE = [s.value for s in BuildStatus if not s.is_terminal]

#: One GROUP BY over the live statuses' range of ``ix_builds_status``: finished builds, which
#: pile up, are not read.
_live_summary = (
    select(
        b.c.queue,
        b.c.status,
        func.count().label("builds"),
        (NOW - func.min(b.c.created_at)).label("oldest_age_ms"),
    )
    .where(b.c.status.in_(LIVE))
    .group_by(b.c.queue, b.c.status)
)


# The poll loop's statements, built once: constructing a Core statement per call cost more
# Python than executing it (bench: record_poll was a third of a daemon's CPU).
_P_BUILD = bindparam("p_build_id", type_=b.c.build_id.type)
_select_by_build = select(b).where(b.c.build_id == _P_BUILD)
_select_by_request = select(b).where(b.c.request_id == bindparam("p_request_id"))
_record_poll = (
    update(b)
    .where(b.c.build_id == _P_BUILD, _not_terminal)
    .values(
        status=bindparam("p_status"),
        metadata=bindparam("p_metadata"),
        polls=bindparam("p_polls"),
        next_poll_at=NOW + bindparam("p_next_poll_ms"),
        updated_at=NOW,
    )
)
_finish = (
    update(b)
    .where(b.c.build_id == _P_BUILD, _not_terminal)
    .values(
        status=bindparam("p_status"),
        metadata=bindparam("p_metadata"),
        failure_reason=bindparam("p_failure_reason"),
        error=bindparam("p_error"),
        finished_at=NOW,
        next_poll_at=None,
        updated_at=NOW,
        polls=b.c.polls + 1,
    )
)
_insert_triggered = _insert_build.values(
    request_id=bindparam("p_request_id"),
    build_id=_P_BUILD,
    queue=bindparam("p_queue"),
    runner=bindparam("p_runner"),
    status=BuildStatus.ACCEPTED.value,
    metadata="{}",
    request_metadata=bindparam("p_request_metadata"),
    changes=bindparam("p_changes"),
    polls=0,
    created_at=NOW,
    updated_at=NOW,
)
_mark_cancel_sent = update(b).where(b.c.build_id == _P_BUILD).values(cancel_sent_at=NOW)


def _dump(value: Mapping[str, str]) -> str:
    return json.dumps(dict(value), ensure_ascii=False, sort_keys=True)


def _changes(request: BuildRequest) -> str:
    return json.dumps(
        {"base": [c.to_json() for c in request.base], "head": [c.to_json() for c in request.head]},
        ensure_ascii=False,
    )


def to_build(row: Any) -> Build:
    changes = json.loads(row.changes or "{}")
    return Build(
        request_id=row.request_id,
        build_id=row.build_id,
        queue=row.queue,
        runner=row.runner,
        status=row.status,
        metadata=json.loads(row.metadata or "{}"),
        request_metadata=json.loads(row.request_metadata or "{}"),
        base=[Change.from_json(c) for c in changes.get("base", [])],
        head=[Change.from_json(c) for c in changes.get("head", [])],
        failure_reason=row.failure_reason,
        error=row.error,
        polls=int(row.polls),
        created_at_ms=int(row.created_at),
        updated_at_ms=int(row.updated_at),
        finished_at_ms=None if row.finished_at is None else int(row.finished_at),
        next_poll_at_ms=None if row.next_poll_at is None else int(row.next_poll_at),
        cancel_requested_at_ms=_opt_int(row.cancel_requested_at),
        cancel_sent_at_ms=_opt_int(row.cancel_sent_at),
    )


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


class SqlBuildWrites:
    """Build store operations bound to one connection (one transaction).

    ``finished`` lists the builds this transaction made terminal: the daemon counts them in
    its metrics once the transaction commits, so a step that rolls back and runs again
    counts once.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.finished: list[Build] = []

    def get_by_build(self, build_id: str) -> Build | None:
        row = self.conn.execute(_select_by_build, {"p_build_id": build_id}).first()
        return None if row is None else to_build(row)

    def get_by_request(self, request_id: str) -> Build | None:
        row = self.conn.execute(_select_by_request, {"p_request_id": request_id}).first()
        return None if row is None else to_build(row)

    def insert_triggered(self, request: BuildRequest, build_id: str, runner: str) -> bool:
        params = {
            "p_request_id": request.request_id,
            "p_build_id": build_id,
            "p_queue": request.queue,
            "p_runner": runner,
            "p_request_metadata": _dump(request.metadata),
            "p_changes": _changes(request),
        }
        return self.conn.execute(_insert_triggered, params).rowcount == 1

    def record_poll(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        polls: int,
        next_poll_ms: int,
    ) -> None:
        # Unconditional on "changed": the row always matches, so rowcount is never misread
        # as "not found" (the system this descends from dead-lettered healthy polls that way).
        self.conn.execute(
            _record_poll,
            {
                "p_build_id": build_id,
                "p_status": status.value,
                "p_metadata": _dump(metadata),
                "p_polls": polls,
                "p_next_poll_ms": next_poll_ms,
            },
        )

    def finish(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        failure_reason: str | None = None,
        error: str | None = None,
    ) -> Build | None:
        assert status.is_terminal, status
        changed = self.conn.execute(
            _finish,
            {
                "p_build_id": build_id,
                "p_status": status.value,
                "p_metadata": _dump(metadata),
                "p_failure_reason": failure_reason,
                "p_error": None if error is None else error[:_ERROR_MAX],
            },
        ).rowcount
        if not changed:
            return None
        return self._noted(self.get_by_build(build_id))

    def fail_request(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> Build | None:
        existing = self.get_by_request(request_id)
        if existing is not None and existing.build_id is not None:
            return self.finish(
                existing.build_id,
                BuildStatus.FAILED,
                {**existing.metadata, "failure_reason": "infra"},
                failure_reason="infra",
                error=error,
            )
        if existing is not None:
            return None  # a request that never triggered is only ever recorded failed
        values = {
            "request_id": request_id,
            "build_id": None,
            "queue": request.queue if request else "",
            "runner": "",
            "status": BuildStatus.FAILED.value,
            "metadata": _dump({"failure_reason": "infra"}),
            "request_metadata": _dump(request.metadata if request else {}),
            "changes": _changes(request) if request else "{}",
            "failure_reason": "infra",
            "error": error[:_ERROR_MAX],
            "polls": 0,
            "created_at": NOW,
            "updated_at": NOW,
            "finished_at": NOW,
        }
        if self.conn.execute(_insert_build.values(values)).rowcount == 0:
            return None
        return self._noted(self.get_by_request(request_id))

    def mark_cancel_sent(self, build_id: str) -> None:
        self.conn.execute(_mark_cancel_sent, {"p_build_id": build_id})

    def _noted(self, build: Build | None) -> Build | None:
        if build is not None:
            self.finished.append(build)
        return build


class SqlBuildStore:
    """Reads and single-statement writes outside a queue transaction (CLI, daemon)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, ident: str) -> Build | None:
        """A build by build id or by request id."""
        stmt = select(b).where((b.c.build_id == ident) | (b.c.request_id == ident))
        row = self.db.read(lambda conn: conn.execute(stmt).first())
        return None if row is None else to_build(row)

    def get_by_build(self, build_id: str) -> Build | None:
        return self.db.read(lambda conn: SqlBuildWrites(conn).get_by_build(build_id))

    def get_by_request(self, request_id: str) -> Build | None:
        return self.db.read(lambda conn: SqlBuildWrites(conn).get_by_request(request_id))

    def list_builds(
        self, statuses: Sequence[str] | None = None, limit: int = 100, queue: str | None = None
    ) -> list[Build]:
        stmt = select(b).order_by(b.c.created_at.desc(), b.c.request_id).limit(limit)
        if statuses:
            stmt = stmt.where(b.c.status.in_(list(statuses)))
        if queue:
            stmt = stmt.where(b.c.queue == queue)
        return [to_build(r) for r in self.db.read(lambda conn: conn.execute(stmt).all())]

    def in_flight(self, limit: int = 200) -> list[Build]:
        return self.list_builds(LIVE, limit)

    def live_summary(self) -> list[dict[str, Any]]:
        """Live builds per queue and status, with the oldest one's age (ms)."""
        return [dict(r) for r in self.db.read(lambda c: c.execute(_live_summary).mappings().all())]

    def count_by_status(self) -> dict[str, int]:
        stmt = select(b.c.status, func.count()).group_by(b.c.status)
        return {s: int(n) for s, n in self.db.read(lambda conn: conn.execute(stmt).all())}

    def request_cancel(self, build_id: str) -> bool:
        """Ask for cancellation; the poll loop sends it to the runner. False if finished/unknown."""
        stmt = (
            update(b)
            .where(b.c.build_id == bindparam("p_build_id"), _not_terminal)
            .values(cancel_requested_at=func.coalesce(b.c.cancel_requested_at, NOW))
        )
        changed = self.db.write(lambda conn: conn.execute(stmt, {"p_build_id": build_id}).rowcount)
        return bool(changed)

    def now_ms(self) -> int:
        return int(self.db.read(lambda conn: conn.execute(select(NOW)).scalar_one()))
