"""Every statement the operator's tools run (``buildq queue …``, ``buildq dlq …``, the status
page), but the counts per topic and group (``stats_queries``, which the metrics read too).

Kept apart from ``queries.py`` so the hot path's file holds only what the daemon runs. Same
conventions: bindparams are named ``p_<name>`` (fill them with ``queries.params``), times are
epoch ms from the database clock, and nothing here branches on the dialect.
"""

from __future__ import annotations

from sqlalchemy import (
    Delete,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    case,
    delete,
    func,
    literal,
    select,
    update,
)

from buildq.queue.sql.queries import COPIED_MESSAGE_COLUMNS, NOW
from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import leases as lease
from buildq.queue.sql.schema import messages as m
from buildq.queue.sql.schema import subscribers as sub
from buildq.storage.dialect import insert_ignore

#: Size and span of one topic's log.
select_topic_summary = select(
    func.count().label("messages"),
    func.count(func.distinct(m.c.partition_key)).label("partitions"),
    func.min(m.c.seq).label("first_offset"),
    func.max(m.c.seq).label("last_offset"),
    func.min(m.c.created_at).label("oldest_created_at_ms"),
    func.max(m.c.created_at).label("newest_created_at_ms"),
    func.coalesce(func.sum(func.length(m.c.payload)), 0).label("payload_bytes"),
).where(m.c.topic == bindparam("p_topic"))

_pending_groups = (
    select(func.count()).where(d.c.seq == m.c.seq).scalar_subquery().label("pending_groups")
)
_listed = select(
    m.c.seq.label("offset"),
    m.c.partition_key,
    m.c.message_id,
    m.c.dlq_group,
    m.c.created_at.label("created_at_ms"),
    m.c.visible_after.label("visible_after_ms"),
    func.length(m.c.payload).label("payload_bytes"),
    _pending_groups,
)

#: The newest messages of a topic.
select_messages = (
    _listed.where(m.c.topic == bindparam("p_topic"))
    .order_by(m.c.seq.desc())
    .limit(bindparam("p_limit", type_=Integer))
)
#: The newest messages of one partition of a topic.
select_partition_messages = (
    _listed.where(
        m.c.topic == bindparam("p_topic"), m.c.partition_key == bindparam("p_partition_key")
    )
    .order_by(m.c.seq.desc())
    .limit(bindparam("p_limit", type_=Integer))
)

#: Every row of a topic with this message id (one per partition, and per group in a DLQ).
select_message_rows = (
    select(
        m.c.seq.label("offset"),
        m.c.topic,
        m.c.partition_key,
        m.c.message_id,
        m.c.dlq_group,
        m.c.partition_hash,
        m.c.payload,
        m.c.metadata,
        m.c.visible_after.label("visible_after_ms"),
        m.c.created_at.label("created_at_ms"),
        m.c.original_topic,
        m.c.failed_at.label("failed_at_ms"),
        m.c.failure_count,
        m.c.last_error,
    )
    .where(m.c.topic == bindparam("p_topic"), m.c.message_id == bindparam("p_message_id"))
    .order_by(m.c.seq)
)

#: The pending deliveries of one message, per group.
select_message_deliveries = (
    select(
        d.c.grp,
        d.c.slot,
        d.c.visible_at.label("visible_at_ms"),
        d.c.inflight,
        d.c.attempt,
        d.c.retry_count,
        d.c.owner,
        d.c.delivered_at.label("delivered_at_ms"),
        d.c.last_error,
    )
    .where(d.c.seq == bindparam("p_seq"))
    .order_by(d.c.grp)
)

#: The consumer groups of a topic.
select_topic_groups = (
    select(g.c.grp, g.c.slots).where(g.c.topic == bindparam("p_topic")).order_by(g.c.grp)
)

#: Every lease, with the database's now to judge it by.
select_all_leases = select(
    lease.c.topic,
    lease.c.grp,
    lease.c.slot,
    lease.c.owner,
    lease.c.epoch,
    lease.c.expires_at.label("expires_at_ms"),
    NOW.label("now_ms"),
).order_by(lease.c.topic, lease.c.grp, lease.c.slot)

#: Leases whose owner stopped renewing them.
select_stale_leases = select_all_leases.where(lease.c.owner != "", lease.c.expires_at < NOW)

#: Members whose heartbeat is older than ``older_than_ms``.
select_stale_subscribers = (
    select(
        sub.c.id,
        sub.c.topic,
        sub.c.grp.label("group"),
        sub.c.host,
        sub.c.pid,
        sub.c.started_at.label("started_at_ms"),
        sub.c.heartbeat_at.label("heartbeat_at_ms"),
        (NOW - sub.c.heartbeat_at).label("silent_for_ms"),
    )
    .where(sub.c.heartbeat_at < NOW - bindparam("p_older_than_ms"))
    .order_by(sub.c.topic, sub.c.grp, sub.c.id)
)

_group_leases = and_(lease.c.grp == bindparam("p_grp"), lease.c.topic == bindparam("p_topic"))
#: Free the given slots of a group (their holder is fenced out once someone takes them).
release_lease_slots: Update = (
    update(lease)
    .where(_group_leases, lease.c.slot.in_(bindparam("p_slots", expanding=True)))
    .values(owner="", expires_at=0)
)
#: Free every lease a member holds in a group.
release_owner_leases: Update = (
    update(lease)
    .where(_group_leases, lease.c.owner == bindparam("p_owner"))
    .values(owner="", expires_at=0)
)
#: Free every lease of a group.
release_group_leases: Update = (
    update(lease).where(_group_leases, lease.c.owner != "").values(owner="", expires_at=0)
)

#: The group's slot count, which places a message's delivery.
select_group_slots = select(g.c.slots).where(
    g.c.topic == bindparam("p_topic"), g.c.grp == bindparam("p_grp")
)

#: The next batch of a topic's offsets in a range, ascending.
select_offsets = (
    select(m.c.seq)
    .where(
        m.c.topic == bindparam("p_topic"),
        m.c.seq >= bindparam("p_from_offset"),
        m.c.seq <= bindparam("p_to_offset"),
    )
    .order_by(m.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
)

#: The highest offset of a topic (NULL when it is empty).
select_last_offset = select(func.max(m.c.seq)).where(m.c.topic == bindparam("p_topic"))

# Due now, unless the message itself is still delayed (a reset must not deliver it early).
_DUE = case((m.c.visible_after > NOW, m.c.visible_after), else_=NOW)

#: Give a group deliveries of these messages unless it has them already.
insert_group_deliveries = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(m.c.seq, g.c.grp, m.c.topic, m.c.partition_hash % g.c.slots, _DUE)
    .join(g, and_(g.c.topic == m.c.topic, g.c.grp == bindparam("p_grp")))
    .where(m.c.seq.in_(bindparam("p_seqs", expanding=True))),
)

#: Messages from ``from_offset`` on that the group has no delivery of (reset-offset dry run).
count_missing_deliveries = select(func.count()).where(
    m.c.topic == bindparam("p_topic"),
    m.c.seq >= bindparam("p_from_offset"),
    ~select(d.c.seq).where(d.c.seq == m.c.seq, d.c.grp == bindparam("p_grp")).exists(),
)

#: A group's pending deliveries of a topic before an offset.
select_deliveries_before = (
    select(d.c.seq)
    .where(
        d.c.grp == bindparam("p_grp"),
        d.c.topic == bindparam("p_topic"),
        d.c.seq < bindparam("p_before_offset"),
    )
    .order_by(d.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
)
#: Count of the same (reset-offset dry run).
count_deliveries_before = select(func.count()).where(
    d.c.grp == bindparam("p_grp"),
    d.c.topic == bindparam("p_topic"),
    d.c.seq < bindparam("p_before_offset"),
)

#: Drop one group's deliveries of these messages.
delete_group_deliveries: Delete = delete(d).where(
    d.c.grp == bindparam("p_grp"), d.c.seq.in_(bindparam("p_seqs", expanding=True))
)
#: Drop every group's deliveries of these messages.
delete_deliveries: Delete = delete(d).where(d.c.seq.in_(bindparam("p_seqs", expanding=True)))
#: Drop these messages from the log (their deliveries first).
delete_messages: Delete = delete(m).where(m.c.seq.in_(bindparam("p_seqs", expanding=True)))

# --- dead letters ---------------------------------------------------------------------------

_dead_letter_columns = (
    m.c.seq.label("offset"),
    m.c.partition_key,
    m.c.message_id,
    m.c.dlq_group.label("failed_group"),
    m.c.original_topic,
    m.c.failure_count,
    m.c.failed_at.label("failed_at_ms"),
    m.c.last_error,
)


def select_dead_letters(
    *, by_id: bool, by_partition: bool, by_group: bool, by_error: bool, by_age: bool
) -> Select[tuple[object, ...]]:
    """Dead letters of ``dlq_topic``, oldest first, narrowed by the filters switched on.

    Bindparams: ``message_id``, ``partition_key``, ``grp``, ``error_contains`` (case-sensitive
    substring: INSTR behaves the same on both engines, LIKE does not), ``older_than_ms``,
    and the page: ``after_offset``, ``to_offset``, ``limit``.
    """
    stmt = select(*_dead_letter_columns).where(
        m.c.topic == bindparam("p_dlq_topic"),
        m.c.seq > bindparam("p_after_offset"),
        m.c.seq <= bindparam("p_to_offset"),
    )
    if by_id:
        stmt = stmt.where(m.c.message_id == bindparam("p_message_id"))
    if by_partition:
        stmt = stmt.where(m.c.partition_key == bindparam("p_partition_key"))
    if by_group:
        stmt = stmt.where(m.c.dlq_group == bindparam("p_grp"))
    if by_error:
        stmt = stmt.where(func.instr(m.c.last_error, bindparam("p_error_contains")) > 0)
    if by_age:
        stmt = stmt.where(m.c.failed_at < NOW - bindparam("p_older_than_ms"))
    return stmt.order_by(m.c.seq).limit(bindparam("p_limit", type_=Integer))


#: One dead letter by offset (read again inside the requeue's transaction).
select_dead_letter = select(*_dead_letter_columns).where(
    m.c.seq == bindparam("p_seq"), m.c.dlq_group != ""
)

#: The live message a dead letter was copied from, if it is still retained.
select_original_seq = select(m.c.seq).where(
    m.c.topic == bindparam("p_topic"),
    m.c.partition_key == bindparam("p_partition_key"),
    m.c.message_id == bindparam("p_message_id"),
    m.c.dlq_group == "",
)

#: Put a purged original back into its topic from its dead letter (no DLQ fields, visible now).
restore_original = insert_ignore(m).from_select(
    COPIED_MESSAGE_COLUMNS,
    select(
        m.c.original_topic,
        m.c.partition_key,
        m.c.message_id,
        literal(""),
        m.c.partition_hash,
        m.c.payload,
        m.c.metadata,
        literal(0),
        NOW,
        bindparam("p_publish_token", type_=m.c.publish_token.type),
    ).where(m.c.seq == bindparam("p_seq")),
)

#: Make a group's waiting delivery fresh: due now, no failures. One in flight is left alone.
reset_delivery: Update = (
    update(d)
    .where(d.c.seq == bindparam("p_seq"), d.c.grp == bindparam("p_grp"), d.c.inflight == 0)
    .values(visible_at=NOW, retry_count=0, last_error=None)
)

#: Does the group have a delivery of the message (after a requeue wrote one)?
count_delivery = select(func.count()).where(
    d.c.seq == bindparam("p_seq"), d.c.grp == bindparam("p_grp")
)

# --- the web status page (buildq web) -------------------------------------------------------

#: Every member with its heartbeat's age (the live daemons, and silent ones until cleaned up).
select_members = select(
    sub.c.id,
    sub.c.topic,
    sub.c.grp.label("group"),
    sub.c.host,
    sub.c.pid,
    sub.c.started_at.label("started_at_ms"),
    sub.c.heartbeat_at.label("heartbeat_at_ms"),
    (NOW - sub.c.heartbeat_at).label("silent_for_ms"),
).order_by(sub.c.topic, sub.c.grp, sub.c.id)

#: A topic's pending deliveries that failed at least once (nacked: a runner or database error),
#: most retried first: what a consumer is struggling with right now.
select_retrying_deliveries = (
    select(
        m.c.partition_key,
        m.c.message_id,
        d.c.grp.label("group"),
        d.c.retry_count,
        d.c.last_error,
        d.c.visible_at.label("visible_at_ms"),
    )
    .join(m, m.c.seq == d.c.seq)
    .where(d.c.topic == bindparam("p_topic"), d.c.retry_count > 0)
    .order_by(d.c.retry_count.desc(), d.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
)

#: One message of a topic by partition and id, through the identity index (finding it by id
#: alone, as ``select_message_rows`` does, scans the topic).
select_partition_message = select(
    m.c.seq.label("offset"),
    m.c.payload,
    m.c.created_at.label("created_at_ms"),
).where(
    m.c.topic == bindparam("p_topic"),
    m.c.partition_key == bindparam("p_partition_key"),
    m.c.message_id == bindparam("p_message_id"),
    m.c.dlq_group == "",
)
