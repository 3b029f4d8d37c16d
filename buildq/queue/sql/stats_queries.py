"""The aggregate behind the queue's numbers (``stats.fold_stats`` reads its rows): per topic and
group, the log's size, the pending deliveries and the known groups, in one statement.

Same conventions as ``queries.py``: bindparams are named ``p_<name>``, times are epoch ms from
the database clock, and nothing here branches on the dialect.
"""

from __future__ import annotations

from sqlalchemy import (
    BindParameter,
    ColumnElement,
    CompoundSelect,
    Integer,
    and_,
    bindparam,
    case,
    func,
    literal,
    null,
    select,
    union_all,
)

from buildq.queue.contract import DLQ_SUFFIX
from buildq.queue.sql.queries import NOW
from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import messages as m

_READY = and_(d.c.inflight == 0, d.c.visible_at <= NOW)
_DELAYED = and_(d.c.inflight == 0, d.c.visible_at > NOW)
# A fresh delivery of an undelayed message has visible_at 0: it became ready when published.
_READY_SINCE = case((d.c.visible_at == 0, m.c.created_at), else_=d.c.visible_at)


def _count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
    return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)


def _topic_stats(*, of_topics: bool, whole_log: bool) -> CompoundSelect[tuple[object, ...]]:
    """Per (topic, group): the log's rows, the pending deliveries, and the known groups.

    One statement so a refresh is one round trip; the ``kind`` column says which part a row
    comes from. Log rows of a DLQ topic carry the failed group in ``grp``. Without
    ``whole_log`` only the DLQ topics' rows are counted: the log is never pruned, so counting
    all of it costs a scan that grows forever, while pending deliveries and dead letters stay
    small.
    """
    zero = literal(0, Integer)
    log = select(
        literal("log").label("kind"),
        m.c.topic,
        m.c.dlq_group.label("grp"),
        func.count().label("total"),
        zero.label("ready"),
        zero.label("delayed"),
        zero.label("in_flight"),
        null().label("oldest_ready_age_ms"),
        zero.label("max_retry_count"),
    ).group_by(m.c.topic, m.c.dlq_group)
    pending = (
        select(
            literal("pending").label("kind"),
            d.c.topic,
            d.c.grp,
            func.count().label("total"),
            _count_if(_READY).label("ready"),
            _count_if(_DELAYED).label("delayed"),
            _count_if(d.c.inflight == 1).label("in_flight"),
            (NOW - func.min(case((_READY, _READY_SINCE)))).label("oldest_ready_age_ms"),
            func.max(d.c.retry_count).label("max_retry_count"),
        )
        .join(m, m.c.seq == d.c.seq)
        .group_by(d.c.topic, d.c.grp)
    )
    known = select(
        literal("group").label("kind"),
        g.c.topic,
        g.c.grp,
        g.c.slots.label("total"),
        zero.label("ready"),
        zero.label("delayed"),
        zero.label("in_flight"),
        null().label("oldest_ready_age_ms"),
        zero.label("max_retry_count"),
    )
    if not whole_log:
        log = log.where(m.c.topic.in_(select(g.c.topic + literal(DLQ_SUFFIX))))
    if of_topics:
        topics: BindParameter[str] = bindparam("p_topics", expanding=True)
        log = log.where(m.c.topic.in_(topics))
        pending = pending.where(d.c.topic.in_(topics))
        known = known.where(g.c.topic.in_(topics))
    return union_all(log, pending, known)


#: Counts per topic and group over the whole queue, log sizes included (``queue topics``).
select_all_topic_stats = _topic_stats(of_topics=False, whole_log=True)
#: The same for the topics in ``topics`` (a topic and its DLQ topic).
select_topic_stats = _topic_stats(of_topics=True, whole_log=True)
#: Per group: pending deliveries and dead letters, without sizing the logs (metrics).
select_group_stats = _topic_stats(of_topics=False, whole_log=False)
