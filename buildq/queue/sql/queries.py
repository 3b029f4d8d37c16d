"""Every statement the queue runs, named verb_noun, built once and reused.

Statements compile per dialect (see ``dialect.py``); callers pass plain parameter dicts.
``docs/queue.md`` explains the claim/fetch path and the indexes these rely on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Delete,
    Insert,
    Integer,
    Select,
    Update,
    and_,
    bindparam,
    delete,
    exists,
    literal,
    select,
    update,
)

from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import messages as m
from buildq.storage.dialect import db_now_ms, insert_ignore

NOW = db_now_ms()


def _insert_messages(
    visible_after: ColumnElement[int], created_at: ColumnElement[int] = NOW
) -> Insert:
    return insert_ignore(m).values(
        topic=bindparam("p_topic"),
        partition_key=bindparam("p_partition_key"),
        message_id=bindparam("p_message_id"),
        partition_hash=bindparam("p_partition_hash"),
        payload=bindparam("p_payload"),
        metadata=bindparam("p_metadata"),
        visible_after=visible_after,
        created_at=created_at,
        publish_token=bindparam("p_publish_token"),
    )


#: Insert messages visible from an absolute time (``visible_after`` ms; 0 = now).
insert_messages_at = _insert_messages(bindparam("p_visible_after", type_=m.c.visible_after.type))
#: Insert a batch with every value a parameter (``created_at`` read from the database clock
#: first): PyMySQL turns such an executemany into one multi-row INSERT, which it cannot do
#: when VALUES holds a SQL expression.
insert_message_rows = _insert_messages(
    bindparam("p_visible_after", type_=m.c.visible_after.type),
    bindparam("p_created_at", type_=m.c.created_at.type),
)
#: Insert messages visible ``delay_ms`` after the database's now.
insert_messages_after = _insert_messages(
    NOW + bindparam("p_delay_ms", type_=m.c.visible_after.type)
)

#: Give every group of the topic a delivery of the messages this publish call inserted.
#: Groups still being backfilled are included: the backfill's INSERT IGNORE skips the overlap.
fan_out_messages = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(m.c.seq, g.c.grp, m.c.topic, m.c.partition_hash % g.c.slots, m.c.visible_after)
    .join(g, g.c.topic == m.c.topic)
    .where(
        m.c.topic == bindparam("p_topic"),
        m.c.partition_key.in_(bindparam("p_partition_keys", expanding=True)),
        m.c.message_id.in_(bindparam("p_message_ids", expanding=True)),
        m.c.dlq_group == bindparam("p_dlq_group"),
        m.c.publish_token == bindparam("p_publish_token"),
    ),
)

#: The deliveries of one message found by its offset: a single-row publish knows it from the
#: INSERT, so it needs no IN-lists over the unique key (SQLAlchemy expands those per execution).
fan_out_message = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(m.c.seq, g.c.grp, m.c.topic, m.c.partition_hash % g.c.slots, m.c.visible_after)
    .join(g, g.c.topic == m.c.topic)
    .where(m.c.seq == bindparam("p_seq")),
)

#: Ids, among those given, that this publish call inserted (used only when some were dups).
select_published_ids = select(m.c.partition_key, m.c.message_id).where(
    m.c.topic == bindparam("p_topic"),
    m.c.partition_key.in_(bindparam("p_partition_keys", expanding=True)),
    m.c.message_id.in_(bindparam("p_message_ids", expanding=True)),
    m.c.dlq_group == "",
    m.c.publish_token == bindparam("p_publish_token"),
)

#: Messages of one partition after an offset that are visible at a given time.
fetch_by_offset = (
    select(m)
    .where(
        m.c.topic == bindparam("p_topic"),
        m.c.partition_key == bindparam("p_partition_key"),
        m.c.seq > bindparam("p_after_offset"),
        m.c.visible_after <= bindparam("p_now_ms"),
    )
    .order_by(m.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
)

_due_in_my_slots = and_(
    d.c.grp == bindparam("p_grp"),
    d.c.topic == bindparam("p_topic"),
    d.c.slot.in_(bindparam("p_slots", expanding=True)),
)

#: Lock up to ``limit`` due deliveries of the member's slots, oldest due first.
#:
#: FOR UPDATE, deliberately not SKIP LOCKED: each slot has one leaseholder, so members never
#: compete for the same rows, but a member's scan does lock other slots' rows for an instant
#: on its way past them. With SKIP LOCKED the owner would skip such a row and claim the next
#: message of that partition first (seen in tests/system/scale: partition order broken);
#: waiting the moment it takes the other short transaction to move on keeps the order.
#: ``visible_at`` (still in the index) is when each became due, for the dispatch-lag metric.
claim_due = (
    select(d.c.seq, d.c.visible_at, d.c.slot)
    .where(_due_in_my_slots, d.c.visible_at <= NOW)
    .order_by(d.c.visible_at, d.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
    .with_for_update()
)

#: Mark claimed rows in flight. A row that was already in flight timed out: that is a retry.
#: (MySQL evaluates SET left to right, so retry_count must read inflight before it changes.)
mark_claimed: Update = (
    update(d)
    .where(d.c.grp == bindparam("p_grp"), d.c.seq.in_(bindparam("p_seqs", expanding=True)))
    .ordered_values(
        (d.c.retry_count, d.c.retry_count + d.c.inflight),
        (d.c.inflight, 1),
        (d.c.attempt, d.c.attempt + 1),
        (d.c.owner, bindparam("p_owner")),
        (d.c.delivered_at, NOW),
        (d.c.visible_at, NOW + bindparam("p_visibility_timeout_ms")),
    )
)

#: The claimed deliveries with their messages.
select_claimed: Select[tuple[object, ...]] = (
    select(
        d.c.seq,
        d.c.slot,
        d.c.attempt,
        d.c.retry_count,
        d.c.last_error.label("delivery_error"),
        d.c.delivered_at,
        m.c.partition_key,
        m.c.message_id,
        m.c.payload,
        m.c.metadata,
        m.c.visible_after,
        m.c.created_at,
        m.c.dlq_group,
        m.c.original_topic,
        m.c.failed_at,
        m.c.failure_count,
        m.c.last_error,
    )
    .join(m, m.c.seq == d.c.seq)
    .where(d.c.grp == bindparam("p_grp"), d.c.seq.in_(bindparam("p_seqs", expanding=True)))
    .order_by(d.c.seq)
)

#: When the member's next delivery becomes due, relative to the database's now (ms).
select_next_due = (
    select((d.c.visible_at - NOW).label("due_in_ms"))
    .where(_due_in_my_slots)
    .order_by(d.c.visible_at, d.c.seq)
    .limit(1)
)

#: The columns every copy of a message writes (into its DLQ, or back out of it).
COPIED_MESSAGE_COLUMNS = (
    "topic",
    "partition_key",
    "message_id",
    "dlq_group",
    "partition_hash",
    "payload",
    "metadata",
    "visible_after",
    "created_at",
    "publish_token",
)

#: Copy a message into its topic's DLQ, recording which group failed it and why.
insert_dead_letter = insert_ignore(m).from_select(
    [
        *COPIED_MESSAGE_COLUMNS,
        "original_topic",
        "failed_at",
        "failure_count",
        "last_error",
    ],
    select(
        bindparam("p_dlq_topic", type_=m.c.topic.type),
        m.c.partition_key,
        m.c.message_id,
        bindparam("p_grp", type_=m.c.dlq_group.type),
        m.c.partition_hash,
        m.c.payload,
        m.c.metadata,
        literal(0),  # a dead letter's delay was already spent
        NOW,
        bindparam("p_publish_token", type_=m.c.publish_token.type),
        m.c.topic,
        NOW,
        bindparam("p_failure_count", type_=m.c.failure_count.type),
        bindparam("p_error", type_=m.c.last_error.type),
    ).where(m.c.seq == bindparam("p_seq")),
)

#: Drop one group's delivery of a message (after its dead letter is written).
delete_delivery: Delete = delete(d).where(
    d.c.seq == bindparam("p_seq"), d.c.grp == bindparam("p_grp")
)

#: Make a partition's waiting (not in-flight) deliveries due now: a webhook's "poll it now".
expedite_partition: Update = (
    update(d)
    .where(
        d.c.topic == bindparam("p_topic"),
        d.c.inflight == 0,
        d.c.visible_at > NOW,
        d.c.seq.in_(
            select(m.c.seq).where(
                m.c.topic == bindparam("p_topic"), m.c.partition_key == bindparam("p_partition_key")
            )
        ),
    )
    .values(visible_at=NOW)
)

select_db_now = select(NOW)

#: A message's identity by offset.
select_message_key = select(m.c.partition_key, m.c.message_id).where(m.c.seq == bindparam("p_seq"))


def params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Statement parameters from plain names: every bindparam here is named ``p_<name>``
    because SQLAlchemy reserves a table's column names for INSERT/UPDATE values."""
    return {f"p_{key}": value for key, value in values.items()}


def many(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``params`` for each row of an executemany."""
    return [params(row) for row in rows]


# --- retention ------------------------------------------------------------------------------

_done_everywhere = ~exists().where(d.c.seq == m.c.seq)

#: Oldest messages past the retention cut-off that no group still has to process.
select_expired = (
    select(m.c.seq, m.c.created_at)
    .where(m.c.seq > bindparam("p_after"), _done_everywhere)
    .order_by(m.c.seq)
    .limit(bindparam("p_limit", type_=Integer))
)

#: Delete them, checking again that no delivery appeared meanwhile (a requeue, a new group).
delete_expired: Delete = delete(m).where(
    m.c.seq.in_(bindparam("p_seqs", expanding=True)),
    m.c.created_at < bindparam("p_cutoff"),
    _done_everywhere,
)
