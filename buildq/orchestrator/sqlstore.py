"""The build store on SQL: the ``builds`` table, read and written with SQLAlchemy Core."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection

from buildq.buildrunner import BuildStatus, Change
from buildq.orchestrator.buildstore import AckedEffect, StepTx
from buildq.orchestrator.model import Build, BuildState, FinishedBuild
from buildq.orchestrator.schema import builds as b
from buildq.orchestrator.sqlbatch import SELECT_STATE, SqlBuildBatch, to_state
from buildq.storage.database import Database
from buildq.storage.dialect import db_now_ms

NOW = db_now_ms()
TERMINAL = [s.value for s in BuildStatus if s.is_terminal]
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


_select_by_build = select(b).where(b.c.build_id == bindparam("p_build_id"))
_select_by_request = select(b).where(b.c.request_id == bindparam("p_request_id"))
_states_by_build = SELECT_STATE.where(b.c.build_id.in_(bindparam("p_ids", expanding=True)))
_states_by_request = SELECT_STATE.where(b.c.request_id.in_(bindparam("p_ids", expanding=True)))


class BatchSession(Protocol):
    """The queue's batch transaction (its ``SqlSession``) as the build store writes in it."""

    @property
    def connection(self) -> Connection: ...

    @property
    def now_ms(self) -> int:
        """The database's clock at the batch's start."""
        ...


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
        return self._one(_select_by_build, {"p_build_id": build_id})

    def get_by_request(self, request_id: str) -> Build | None:
        return self._one(_select_by_request, {"p_request_id": request_id})

    def _one(self, stmt: Any, params: dict[str, Any]) -> Build | None:
        row = self.db.read(lambda conn: conn.execute(stmt, params).first())
        return None if row is None else to_build(row)

    def states_by_build(self, build_ids: Sequence[str]) -> dict[str, BuildState]:
        """The poll loop's view of these builds, in one query."""
        states = self._states(_states_by_build, build_ids)
        return {s.build_id: s for s in states}

    def states_by_request(self, request_ids: Sequence[str]) -> dict[str, BuildState]:
        return {s.request_id: s for s in self._states(_states_by_request, request_ids)}

    def _states(self, stmt: Any, ids: Sequence[str]) -> list[BuildState]:
        if not ids:
            return []
        rows = self.db.read(lambda conn: conn.execute(stmt, {"p_ids": list(ids)}).all())
        return [to_state(row) for row in rows]

    def apply(self, session: BatchSession, steps: Sequence[AckedEffect]) -> list[FinishedBuild]:
        """Run the steps' effects in the batch's transaction (``SqlCommitter``'s hook) and
        write their build rows; the builds it finished. A batch of one writes at once."""
        writes = SqlBuildBatch(session.connection, session.now_ms, immediate=len(steps) == 1)
        for step in steps:
            if step.effect is not None:
                step.effect(StepTx(step.outbox, writes))
        writes.flush()
        return writes.finished

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
