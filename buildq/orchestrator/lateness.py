"""Poll lateness: the one read that joins the build store's table to the queue's message log.

Neither store imports the other's tables (``make imports`` checks), so the statement that
needs both lives here, beside ``engine``, the other place the two meet. The web status page
(``buildq web``) reads it; the daemon never does.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    BigInteger,
    and_,
    bindparam,
    case,
    func,
    literal,
    null,
    select,
    union_all,
)

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.schema import builds as b
from buildq.orchestrator.sqlviews import minute_of
from buildq.orchestrator.topics import BUILDSIGNAL
from buildq.queue.sql.schema import messages as m
from buildq.storage.database import Database

_P_SINCE = bindparam("p_since", type_=BigInteger)
_ALL = [s.value for s in BuildStatus]


def _poll_lateness() -> Any:
    """Per minute since ``p_since``: polls handled, mean and max lateness (ms).

    A poll's lateness is how long after it was due its handler committed. The log has it
    without a history table: the hand-off that handles poll n publishes poll n+1 in the same
    transaction, so poll n+1's ``created_at`` is when poll n was done, and a build's last poll
    was done at its ``finished_at``. Only builds touched since ``p_since`` are read.
    """
    touched = (
        select(b.c.build_id, b.c.finished_at)
        .where(b.c.status.in_(_ALL), b.c.updated_at >= _P_SINCE, b.c.build_id.is_not(None))
        .cte("touched")
    )
    due = case((m.c.visible_after > m.c.created_at, m.c.visible_after), else_=m.c.created_at)
    polls = select(
        m.c.partition_key.label("build_id"),
        m.c.seq.label("seq"),
        m.c.created_at.label("at"),
        due.label("due"),
    ).join_from(
        m,
        touched,
        and_(
            m.c.topic == BUILDSIGNAL, m.c.partition_key == touched.c.build_id, m.c.dlq_group == ""
        ),
    )
    finishes = select(
        touched.c.build_id, literal(2**62, BigInteger), touched.c.finished_at, null()
    ).where(touched.c.finished_at.is_not(None))
    events = union_all(polls, finishes).subquery("events")
    lagged = select(
        events.c.at,
        func.lag(events.c.due)
        .over(partition_by=events.c.build_id, order_by=events.c.seq)
        .label("prev_due"),
    ).subquery("lagged")
    late = case((lagged.c.at > lagged.c.prev_due, lagged.c.at - lagged.c.prev_due), else_=0)
    return (
        select(
            minute_of(lagged.c.at).label("minute_ms"),
            func.count().label("polls"),
            func.avg(late).label("mean_ms"),
            func.max(late).label("max_ms"),
        )
        .where(lagged.c.prev_due.is_not(None), lagged.c.at >= _P_SINCE)
        .group_by(minute_of(lagged.c.at))
    )


_select_poll_lateness = _poll_lateness()


def poll_lateness(db: Database, since_ms: int) -> list[dict[str, Any]]:
    """Per minute since ``since_ms``: polls handled, mean and max lateness (ms)."""
    params = {"p_since": since_ms}
    return db.read(lambda c: [dict(r) for r in c.execute(_select_poll_lateness, params).mappings()])
