"""Every statement of consumer groups, members and leases (``leases.py``): named verb_noun,
built once, bindparams ``p_<name>`` as in ``queries.py`` (fill them with ``queries.params``).

``docs/scaling.md`` explains the lease protocol these implement.
"""

from __future__ import annotations

from sqlalchemy import Delete, Update, and_, bindparam, delete, func, or_, select, update

from buildq.queue.sql.queries import NOW
from buildq.queue.sql.schema import deliveries as d
from buildq.queue.sql.schema import groups as g
from buildq.queue.sql.schema import leases as lease
from buildq.queue.sql.schema import messages as m
from buildq.queue.sql.schema import subscribers as sub
from buildq.storage.dialect import insert_ignore

select_group = select(
    g.c.slots, g.c.ready, g.c.created_at, (NOW - g.c.created_at).label("age_ms")
).where(g.c.topic == bindparam("p_topic"), g.c.grp == bindparam("p_grp"))
insert_group = insert_ignore(g).values(
    topic=bindparam("p_topic"),
    grp=bindparam("p_grp"),
    slots=bindparam("p_slots"),
    ready=0,
    created_at=NOW,
)
insert_lease_rows = insert_ignore(lease).values(
    grp=bindparam("p_grp"), topic=bindparam("p_topic"), slot=bindparam("p_slot")
)
mark_group_ready: Update = (
    update(g)
    .where(g.c.topic == bindparam("p_topic"), g.c.grp == bindparam("p_grp"))
    .values(ready=1)
)

#: Wait for in-flight publishers of the topic to commit (a locking read blocks on their rows).
lock_topic_messages = (
    select(func.count())
    .select_from(m)
    .where(m.c.topic == bindparam("p_topic"))
    .with_for_update(read=True)
)

#: A new group starts from the oldest retained message of its topic.
backfill_group = insert_ignore(d).from_select(
    ["seq", "grp", "topic", "slot", "visible_at"],
    select(
        m.c.seq,
        bindparam("p_grp", type_=d.c.grp.type),
        m.c.topic,
        m.c.partition_hash % bindparam("p_slots"),
        m.c.visible_after,
    ).where(m.c.topic == bindparam("p_topic")),
)

insert_subscriber = insert_ignore(sub).values(
    id=bindparam("p_id"),
    grp=bindparam("p_grp"),
    topic=bindparam("p_topic"),
    host=bindparam("p_host"),
    pid=bindparam("p_pid"),
    started_at=NOW,
    heartbeat_at=NOW,
)
mark_heartbeat: Update = update(sub).where(sub.c.id == bindparam("p_id")).values(heartbeat_at=NOW)
delete_subscriber: Delete = delete(sub).where(sub.c.id == bindparam("p_id"))

#: Live members of a group, in the order that decides who gets the ceil(P/N) shares.
select_live_members = (
    select(sub.c.id)
    .where(
        sub.c.grp == bindparam("p_grp"),
        sub.c.topic == bindparam("p_topic"),
        sub.c.heartbeat_at >= NOW - bindparam("p_stale_ms"),
    )
    .order_by(sub.c.id)
)

#: The group's lease table as the database sees it now.
select_leases = select(
    lease.c.slot, lease.c.owner, lease.c.epoch, lease.c.expires_at, NOW.label("now")
).where(lease.c.grp == bindparam("p_grp"), lease.c.topic == bindparam("p_topic"))

_mine = and_(
    lease.c.grp == bindparam("p_grp"),
    lease.c.topic == bindparam("p_topic"),
    lease.c.owner == bindparam("p_owner"),
)

#: The member's leases that will not expire within ``margin_ms``: what a claim may take from.
select_held_leases = select(lease.c.slot, lease.c.epoch).where(
    lease.c.grp == bindparam("p_grp"),
    lease.c.topic == bindparam("p_topic"),
    lease.c.owner == bindparam("p_owner"),
    lease.c.expires_at >= NOW + bindparam("p_margin_ms"),
)

#: Extend every lease the member holds.
renew_leases: Update = update(lease).where(_mine).values(expires_at=NOW + bindparam("p_lease_ms"))

#: Take free or stale leases; the epoch bump fences out whoever held them before.
acquire_leases: Update = (
    update(lease)
    .where(
        lease.c.grp == bindparam("p_grp"),
        lease.c.topic == bindparam("p_topic"),
        lease.c.slot.in_(bindparam("p_slots", expanding=True)),
        or_(lease.c.owner == "", lease.c.expires_at < NOW),
    )
    .values(
        owner=bindparam("p_owner"),
        epoch=lease.c.epoch + 1,
        expires_at=NOW + bindparam("p_lease_ms"),
    )
)

#: Give leases up so others can take them at once.
release_leases: Update = (
    update(lease)
    .where(_mine, lease.c.slot.in_(bindparam("p_slots", expanding=True)))
    .values(owner="", expires_at=0)
)

#: Forget members whose heartbeat stopped long ago.
purge_dead_subscribers: Delete = delete(sub).where(
    sub.c.grp == bindparam("p_grp"),
    sub.c.topic == bindparam("p_topic"),
    sub.c.heartbeat_at < NOW - bindparam("p_purge_after_ms"),
)

#: Clear owner names from leases that expired long ago (the owner is gone for good).
clear_dead_leases: Update = (
    update(lease)
    .where(
        lease.c.grp == bindparam("p_grp"),
        lease.c.topic == bindparam("p_topic"),
        lease.c.owner != "",
        lease.c.expires_at < NOW - bindparam("p_purge_after_ms"),
    )
    .values(owner="")
)
