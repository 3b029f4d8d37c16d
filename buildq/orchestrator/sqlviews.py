"""Read-only views of the build store for the web status page (``buildq web``).

Each statement reads a bounded set: the live builds, or the builds touched since ``p_since``
through ``ix_builds_status`` (status, updated_at). A finished build's ``updated_at`` is its
``finished_at`` (nothing writes the row after its terminal status), so "finished since" is
an index range. Kept beside ``sqlstore`` rather than in it: the daemon never runs these.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    and_,
    bindparam,
    case,
    func,
    or_,
    select,
)

from buildq.orchestrator.model import Build
from buildq.orchestrator.schema import builds as b
from buildq.orchestrator.sqlstore import LIVE, NOW, TERMINAL, to_build
from buildq.storage.database import Database

_P_SINCE = bindparam("p_since", type_=BigInteger)
MINUTE_MS = 60_000


def minute_of(column: ColumnElement[int]) -> ColumnElement[int]:
    """The start of the minute ``column`` (epoch ms) falls in; same arithmetic on both engines."""
    return column - column % MINUTE_MS


#: Builds finished since ``p_since`` per queue, runner, result and minute.
_finished_since = (
    select(
        b.c.queue,
        b.c.runner,
        b.c.status,
        b.c.failure_reason,
        minute_of(b.c.finished_at).label("minute_ms"),
        func.count().label("builds"),
    )
    .where(b.c.status.in_(TERMINAL), b.c.updated_at >= _P_SINCE, b.c.finished_at >= _P_SINCE)
    .group_by(b.c.queue, b.c.runner, b.c.status, b.c.failure_reason, minute_of(b.c.finished_at))
)

#: Live builds per queue, runner and status: ages, polls overdue by more than ``p_grace_ms``.
_live_polls = (
    select(
        b.c.queue,
        b.c.runner,
        b.c.status,
        func.count().label("builds"),
        (NOW - func.min(b.c.created_at)).label("oldest_age_ms"),
        func.coalesce(
            func.sum(case((b.c.next_poll_at < NOW - bindparam("p_grace_ms"), 1), else_=0)), 0
        ).label("overdue_polls"),
        (NOW - func.min(b.c.next_poll_at)).label("most_overdue_ms"),
        func.count(b.c.cancel_requested_at).label("cancelling"),
    )
    .where(b.c.status.in_(LIVE))
    .group_by(b.c.queue, b.c.runner, b.c.status)
)


def _browse(
    status: str, queue: str | None, reason: str | None, text: str | None, limit: int
) -> Any:
    order = b.c.created_at if status in LIVE else b.c.updated_at
    stmt = select(b).where(b.c.status == status).order_by(order.desc(), b.c.request_id.desc())
    if queue:
        stmt = stmt.where(b.c.queue == queue)
    if reason:
        stmt = stmt.where(b.c.failure_reason == reason)
    if text:  # a case-sensitive substring of either id: INSTR behaves the same on both engines
        found = func.instr(b.c.request_id, text) > 0
        stmt = stmt.where(or_(found, func.instr(func.coalesce(b.c.build_id, ""), text) > 0))
    return stmt.limit(limit), order


class BuildViews:
    """The web page's reads of the build store (see the section comment above)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def finished_since(self, since_ms: int) -> list[dict[str, Any]]:
        return self._rows(_finished_since, {"p_since": since_ms})

    def live_polls(self, grace_ms: int) -> list[dict[str, Any]]:
        return self._rows(_live_polls, {"p_grace_ms": grace_ms})

    def browse(
        self,
        statuses: Sequence[str],
        *,
        queue: str | None = None,
        reason: str | None = None,
        text: str | None = None,
        before: tuple[int, str] | None = None,
        limit: int = 50,
    ) -> list[Build]:
        """Builds in ``statuses``, newest first (live: by trigger; finished: by finish time),
        filtered; ``before`` = (that time, request id) of the last row of the previous page.
        One index-ordered query per status, merged here."""
        rows: list[tuple[int, str, Build]] = []
        for status in statuses:
            stmt, order = _browse(status, queue, reason, text, limit)
            if before is not None:
                at, request_id = before
                stmt = stmt.where(or_(order < at, and_(order == at, b.c.request_id < request_id)))
            for row in self._all(stmt):
                build = to_build(row)
                at_ms = build.created_at_ms if status in LIVE else build.updated_at_ms
                rows.append((at_ms, build.request_id, build))
        rows.sort(key=lambda r: (r[0], r[1]), reverse=True)
        return [build for _, _, build in rows[:limit]]

    def queues_of(self, keys: Sequence[str]) -> dict[str, str]:
        """The queue of each build id or request id in ``keys`` that has a build row."""
        if not keys:
            return {}
        stmt = select(b.c.request_id, b.c.build_id, b.c.queue).where(
            or_(b.c.build_id.in_(list(keys)), b.c.request_id.in_(list(keys)))
        )
        found: dict[str, str] = {}
        for row in self.db.read(lambda conn: conn.execute(stmt).all()):
            found[row.request_id] = row.queue
            if row.build_id is not None:
                found[row.build_id] = row.queue
        return found

    def _all(self, stmt: Any) -> list[Any]:
        return self.db.read(lambda conn: list(conn.execute(stmt).all()))

    def _rows(self, stmt: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.db.read(lambda c: [dict(r) for r in c.execute(stmt, params).mappings()])
