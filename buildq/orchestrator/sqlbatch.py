"""The build writes of a batch of steps, in the batch's transaction.

Buffered while the steps' effects run, then written by ``flush`` in one statement per kind
whatever the batch's size: one multi-row INSERT of triggered builds, one UPDATE finishing
builds, one UPDATE recording polls (a ``CASE`` arm per build), one UPDATE of sent cancels.
Times are the batch's database clock (``SqlSession.now_ms``), so a result can be written without
reading its row back.

A finish is write-once: it only lands on a build that is not terminal. Planning read the
builds as not terminal, and the worker runs one step per build at a time, so a finish that
misses (a dead-letter reconciler finished the build in between) is a conflict: ``flush`` raises
``BatchConflict`` and the worker runs each step again alone, ``immediate``: every write then
executes at once, and a finish that misses returns None, so no second result is published.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.engine import Connection, Dialect

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.buildstore import BatchConflict
from buildq.orchestrator.model import BuildRequest, BuildState, FinishedBuild
from buildq.orchestrator.schema import builds as b
from buildq.storage.dialect import (
    insert_ignore,
    insert_ignore_sql,
    placeholder,
    updates_row_by_row,
)

TERMINAL = tuple(s.value for s in BuildStatus if s.is_terminal)
_ERROR_MAX = 10_000
_NOT_TERMINAL = f"status NOT IN ({', '.join(repr(s) for s in TERMINAL)})"
#: The columns a triggered build's row is written with, in VALUES order.
_TRIGGERED_COLUMNS = (
    "request_id",
    "build_id",
    "queue",
    "runner",
    "status",
    "metadata",
    "request_metadata",
    "changes",
    "polls",
    "created_at",
    "updated_at",
)
_MAX_ROWS = 500
#: The columns a recorded poll and a finish set per build, in the order a buffered row holds
#: their values (after the build id): the CASE and the row-by-row forms both follow them.
_POLL_COLUMNS = ("status", "metadata", "polls", "next_poll_at")
_FINISH_COLUMNS = ("status", "metadata", "failure_reason", "error", "polls")

SELECT_STATE = select(
    b.c.request_id,
    b.c.build_id,
    b.c.queue,
    b.c.runner,
    b.c.status,
    b.c.metadata,
    b.c.polls,
    b.c.created_at,
    b.c.cancel_requested_at,
    b.c.cancel_sent_at,
)
_select_by_request = select(b).where(b.c.request_id == bindparam("p_request_id"))


def dump(value: Mapping[str, str]) -> str:
    return json.dumps(dict(value), ensure_ascii=False, sort_keys=True)


def changes_json(request: BuildRequest) -> str:
    return json.dumps(
        {"base": [c.to_json() for c in request.base], "head": [c.to_json() for c in request.head]},
        ensure_ascii=False,
    )


def to_state(row: Any) -> BuildState:
    return BuildState(
        request_id=row.request_id,
        build_id=row.build_id or "",
        queue=row.queue,
        runner=row.runner,
        status=BuildStatus(row.status),
        metadata_json=row.metadata or "{}",
        polls=int(row.polls),
        created_at_ms=int(row.created_at),
        cancel_requested_at_ms=None
        if row.cancel_requested_at is None
        else int(row.cancel_requested_at),
        cancel_sent_at_ms=None if row.cancel_sent_at is None else int(row.cancel_sent_at),
    )


class _Sql:
    """Size-shaped statements of one dialect, rendered once per size (values are bound)."""

    def __init__(self, dialect: Dialect) -> None:
        self.p = placeholder(dialect)
        self.insert_ignore = insert_ignore_sql(dialect)
        self.row_by_row = updates_row_by_row(dialect)
        #: The row-by-row forms (executemany; see ``dialect.updates_row_by_row``). Params:
        #: the columns' values, then the times the CASE forms bind too, then the build id.
        where_row = f"WHERE build_id = {self.p} AND {_NOT_TERMINAL}"
        self.record_poll_row = (
            f"UPDATE builds SET {self._sets(_POLL_COLUMNS)}, "  # noqa: S608
            f"updated_at = {self.p} {where_row}"
        )
        self.finish_row = (
            f"UPDATE builds SET {self._sets(_FINISH_COLUMNS)}, "  # noqa: S608
            f"finished_at = {self.p}, next_poll_at = NULL, updated_at = {self.p} {where_row}"
        )

    def _sets(self, columns: tuple[str, ...]) -> str:
        return ", ".join(f"{c} = {self.p}" for c in columns)

    def _case(self, column: str, n: int) -> str:
        arms = " ".join(f"WHEN {self.p} THEN {self.p}" for _ in range(n))
        return f"{column} = CASE build_id {arms} END"

    def _where(self, n: int) -> str:
        return f"WHERE build_id IN ({', '.join([self.p] * n)}) AND {_NOT_TERMINAL}"

    @lru_cache(maxsize=512)  # noqa: B019 (one instance per dialect, for the process)
    def insert_triggered(self, n: int) -> str:
        row = "(" + ", ".join([self.p] * len(_TRIGGERED_COLUMNS)) + ")"
        return (
            f"{self.insert_ignore} INTO builds ({', '.join(_TRIGGERED_COLUMNS)}) "
            f"VALUES {', '.join([row] * n)}"
        )

    @lru_cache(maxsize=512)  # noqa: B019
    def record_polls(self, n: int) -> str:
        """Params: per column of ``_POLL_COLUMNS`` the (build, value) pairs, then
        updated_at, then the build ids."""
        sets = ", ".join(self._case(c, n) for c in _POLL_COLUMNS)
        return f"UPDATE builds SET {sets}, updated_at = {self.p} {self._where(n)}"  # noqa: S608

    @lru_cache(maxsize=512)  # noqa: B019
    def finish(self, n: int) -> str:
        """Params: per column of ``_FINISH_COLUMNS`` the (build, value) pairs, then
        finished_at, updated_at, then the build ids."""
        sets = ", ".join(self._case(c, n) for c in _FINISH_COLUMNS)
        return (
            f"UPDATE builds SET {sets}, finished_at = {self.p}, next_poll_at = NULL, "  # noqa: S608
            f"updated_at = {self.p} {self._where(n)}"
        )

    @lru_cache(maxsize=512)  # noqa: B019
    def cancel_sent(self, n: int) -> str:
        ids = ", ".join([self.p] * n)
        return f"UPDATE builds SET cancel_sent_at = {self.p} WHERE build_id IN ({ids})"  # noqa: S608


_SQL: dict[tuple[str, str], _Sql] = {}


def _sql_of(dialect: Dialect) -> _Sql:
    key = (dialect.name, dialect.driver)
    if key not in _SQL:
        _SQL[key] = _Sql(dialect)
    return _SQL[key]


class SqlBuildBatch:
    """``BuildWrites`` for every step of one batch (see the module docstring).

    ``finished`` lists the builds this transaction finished, for the metrics the daemon
    counts once it has committed."""

    def __init__(self, conn: Connection, now_ms: int, *, immediate: bool = False) -> None:
        self.conn = conn
        self.now_ms = now_ms
        self.immediate = immediate
        self.finished: list[FinishedBuild] = []
        self._sql = _sql_of(conn.dialect)
        self._triggered: list[tuple[Any, ...]] = []
        # (build id, then the values of _POLL_COLUMNS / _FINISH_COLUMNS in their order)
        self._polls: list[tuple[str, str, str, int, int]] = []
        self._finishes: list[tuple[str, str, str, str | None, str | None, int]] = []
        self._cancels: list[str] = []

    # --- writes ---------------------------------------------------------------------------------

    def insert_triggered(self, request: BuildRequest, build_id: str, runner: str) -> None:
        self._triggered.append(
            (
                request.request_id,
                build_id,
                request.queue,
                runner,
                BuildStatus.ACCEPTED.value,
                "{}",
                dump(request.metadata),
                changes_json(request),
                0,
                self.now_ms,
                self.now_ms,
            )
        )
        if self.immediate:
            self._flush_triggered()

    def record_poll(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        polls: int,
        next_poll_ms: int,
    ) -> None:
        # Written whether or not anything changed, and its rowcount never read: "0 rows
        # changed" is not "not found" (the system this descends from dead-lettered healthy
        # polls that way).
        row = (build_id, status.value, dump(metadata), polls, self.now_ms + next_poll_ms)
        self._polls.append(row)
        if self.immediate:
            self._flush_polls()

    def finish(
        self,
        build: BuildState,
        status: BuildStatus,
        metadata: Mapping[str, str],
        failure_reason: str | None,
        error: str | None,
        polls: int,
    ) -> FinishedBuild | None:
        assert status.is_terminal, status
        error = None if error is None else error[:_ERROR_MAX]
        self._finishes.append(
            (build.build_id, status.value, dump(metadata), failure_reason, error, polls)
        )
        if self.immediate and not self._flush_finishes():
            return None
        finished = FinishedBuild(
            request_id=build.request_id,
            build_id=build.build_id,
            queue=build.queue,
            status=status.value,
            failure_reason=failure_reason,
            error=error,
            metadata=dict(metadata),
            polls=polls,
            created_at_ms=build.created_at_ms,
            finished_at_ms=self.now_ms,
        )
        self.finished.append(finished)
        return finished

    def fail_request(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> FinishedBuild | None:
        """At once, in every mode: a dead-letter's rare path."""
        self.flush()
        row = self.conn.execute(_select_by_request, {"p_request_id": request_id}).first()
        if row is not None and row.build_id is not None:
            state = to_state(row)
            metadata = {**state.metadata, "failure_reason": "infra"}
            immediate, self.immediate = self.immediate, True
            try:
                return self.finish(
                    state, BuildStatus.FAILED, metadata, "infra", error, state.polls + 1
                )
            finally:
                self.immediate = immediate
        if row is not None:
            return None  # a request that never triggered is only ever recorded failed
        return self._insert_failed(request, request_id, error)

    def _insert_failed(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> FinishedBuild | None:
        metadata = {"failure_reason": "infra"}
        queue = request.queue if request else ""
        error = error[:_ERROR_MAX]
        values: dict[str, Any] = {
            "request_id": request_id,
            "build_id": None,
            "queue": queue,
            "runner": "",
            "status": BuildStatus.FAILED.value,
            "metadata": dump(metadata),
            "request_metadata": dump(request.metadata if request else {}),
            "changes": changes_json(request) if request else "{}",
            "failure_reason": "infra",
            "error": error,
            "polls": 0,
            "created_at": self.now_ms,
            "updated_at": self.now_ms,
            "finished_at": self.now_ms,
        }
        if self.conn.execute(insert_ignore(b).values(values)).rowcount == 0:
            return None
        finished = FinishedBuild(
            request_id=request_id,
            build_id=None,
            queue=queue,
            status=BuildStatus.FAILED.value,
            failure_reason="infra",
            error=error,
            metadata=metadata,
            polls=0,
            created_at_ms=self.now_ms,
            finished_at_ms=self.now_ms,
        )
        self.finished.append(finished)
        return finished

    def mark_cancel_sent(self, build_id: str) -> None:
        self._cancels.append(build_id)
        if self.immediate:
            self._flush_cancels()

    # --- flushing ---------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what is buffered; BatchConflict if a finish missed."""
        self._flush_triggered()
        if self._finishes and not self._flush_finishes():
            raise BatchConflict("a build of this batch was finished meanwhile")
        self._flush_polls()
        self._flush_cancels()

    def _flush_triggered(self) -> None:
        rows, self._triggered = self._triggered, []
        for start in range(0, len(rows), _MAX_ROWS):
            chunk = rows[start : start + _MAX_ROWS]
            flat = tuple(v for row in chunk for v in row)
            self.conn.exec_driver_sql(self._sql.insert_triggered(len(chunk)), flat)

    def _flush_polls(self) -> None:
        rows, self._polls = self._polls, []
        if rows and self._sql.row_by_row:
            per_row = [(*row[1:], self.now_ms, row[0]) for row in rows]
            self.conn.exec_driver_sql(self._sql.record_poll_row, per_row)
            return
        for start in range(0, len(rows), _MAX_ROWS):
            chunk = rows[start : start + _MAX_ROWS]
            params = _cases(chunk, len(_POLL_COLUMNS))
            params += [self.now_ms, *(row[0] for row in chunk)]
            self.conn.exec_driver_sql(self._sql.record_polls(len(chunk)), tuple(params))

    def _flush_finishes(self) -> bool:
        """True if every buffered finish landed."""
        rows, self._finishes = self._finishes, []
        if rows and self._sql.row_by_row:
            per_row = [(*row[1:], self.now_ms, self.now_ms, row[0]) for row in rows]
            return self.conn.exec_driver_sql(self._sql.finish_row, per_row).rowcount == len(rows)
        landed = 0
        for start in range(0, len(rows), _MAX_ROWS):
            chunk = rows[start : start + _MAX_ROWS]
            params = _cases(chunk, len(_FINISH_COLUMNS))
            params += [self.now_ms, self.now_ms, *(row[0] for row in chunk)]
            result = self.conn.exec_driver_sql(self._sql.finish(len(chunk)), tuple(params))
            landed += result.rowcount
        return landed == len(rows)

    def _flush_cancels(self) -> None:
        ids, self._cancels = self._cancels, []
        for start in range(0, len(ids), _MAX_ROWS):
            chunk = ids[start : start + _MAX_ROWS]
            self.conn.exec_driver_sql(self._sql.cancel_sent(len(chunk)), (self.now_ms, *chunk))


def _cases(rows: list[Any], columns: int) -> list[Any]:
    """Rows of (build id, value per column): for each column in turn its CASE's (build id,
    value) pairs, flattened."""
    return [v for column in range(1, columns + 1) for row in rows for v in (row[0], row[column])]


__all__ = ["SqlBuildBatch", "changes_json", "dump", "to_state"]
