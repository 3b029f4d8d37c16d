"""Membership of a consumer group: registration, heartbeats and slot leases.

A group's partitions hash onto a fixed number of slots; each slot has one lease row. Members
renew the leases they hold and rebalance toward a fair share on every renewal: with P slots
and N live members (ordered by id) the first ``P mod N`` members hold ``ceil(P/N)`` and the
rest ``floor(P/N)``, so the shares sum to exactly P and nobody is starved. A member that holds
more than its share first drains in-flight work of the extra slots, then releases them; a
member below its share takes free or stale leases. Taking a lease bumps its epoch, which fences
the previous owner's writes out (see ``SqlSubscription._fence_in`` and ``batch._fence``). Leasing costs a handful of
queries per renewal interval whatever the number of partition keys.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.engine import Connection

from buildq.queue.contract import QueueError
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import lease_queries as lq
from buildq.queue.sql import queries as q
from buildq.storage.database import Database

EventHook = Callable[..., None]
# Stop fetching from a lease this long before the database would call it stale, so a
# member whose renewals stall stops claiming before anyone else can take over.
_LOCAL_SAFETY = 0.8
_GROUP_READY_WAIT_S = 60.0


class GroupMismatch(QueueError):
    """The group exists with a different slot count than this member's config."""


def new_member_id() -> str:
    """Unique across hosts, processes and restarts: two replicas never share a name."""
    return f"{socket.gethostname()[:60]}:{os.getpid()}:{secrets.token_hex(4)}"


def ensure_group(db: Database, topic: str, group: str, slots: int) -> None:
    """Create the group (lease rows, backfill of the retained log) unless it exists."""
    params = {"topic": topic, "grp": group, "slots": slots}
    created = db.write(lambda conn: _create_group(conn, params))
    if created:
        db.write(lambda conn: _backfill(conn, params))
    deadline = time.monotonic() + _GROUP_READY_WAIT_S
    while True:
        row = db.read(lambda conn: conn.execute(lq.select_group, q.params(params)).one())
        if row.slots != slots:
            raise GroupMismatch(
                f"consumer group {group!r} on topic {topic!r} has {row.slots} slots in the "
                f"database but this member is configured with {slots}; use the same value"
            )
        if row.ready:
            return
        if time.monotonic() > deadline or row.age_ms > _GROUP_READY_WAIT_S * 1000:
            # The member that created the group died mid-backfill; the backfill is idempotent.
            db.write(lambda conn: _backfill(conn, params))
        else:
            time.sleep(0.1)


def _create_group(conn: Connection, params: dict[str, Any]) -> bool:
    if conn.execute(lq.insert_group, q.params(params)).rowcount == 0:
        return False
    conn.execute(
        lq.insert_lease_rows,
        q.many(
            [
                {"grp": params["grp"], "topic": params["topic"], "slot": s}
                for s in range(params["slots"])
            ]
        ),
    )
    return True


def _backfill(conn: Connection, params: dict[str, Any]) -> None:
    # A locking read of the topic's rows waits for publishers that inserted a message before
    # the group existed but have not committed; the backfill then sees their rows.
    conn.execute(lq.lock_topic_messages, q.params(params))
    conn.execute(lq.backfill_group, q.params(params))
    conn.execute(lq.mark_group_ready, q.params(params))


class Membership:
    """One member's view of its leases; ``tick()`` renews and rebalances."""

    def __init__(
        self,
        db: Database,
        topic: str,
        group: str,
        settings: SubscriptionSettings,
        *,
        member_id: str | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        self.db = db
        self.topic = topic
        self.group = group
        self.settings = settings
        self.member_id = member_id or new_member_id()
        self._on_event = on_event
        self._lock = threading.Lock()
        self._owned: dict[int, int] = {}  # slot -> epoch
        self._draining: set[int] = set()
        self._valid_until = 0.0  # monotonic
        self._params = {"grp": group, "topic": topic, "owner": self.member_id}
        #: Set while the member holds its fair share of the slots (it can fetch them all).
        self.settled = threading.Event()

    # --- what the fetcher may use ---------------------------------------------------------

    def usable_slots(self) -> dict[int, int]:
        """Slots this member may fetch from now, with their epochs."""
        with self._lock:
            if time.monotonic() >= self._valid_until:
                return {}
            return {s: e for s, e in self._owned.items() if s not in self._draining}

    def owned(self) -> dict[int, int]:
        with self._lock:
            return dict(self._owned)

    # --- lifecycle ---------------------------------------------------------------------------

    def join(self) -> None:
        ensure_group(self.db, self.topic, self.group, self.settings.slots)
        host = self.member_id.partition(":")[0]
        params = self._params | {"id": self.member_id, "host": host, "pid": os.getpid()}
        self.db.write(lambda conn: conn.execute(lq.insert_subscriber, q.params(params)))
        self.tick(busy_slots=set())

    def tick(self, busy_slots: set[int]) -> None:
        """Heartbeat, renew, rebalance. ``busy_slots`` have deliveries still being processed."""
        started = time.monotonic()
        before = self.owned()
        with self._lock:
            was_draining = set(self._draining)
        # Retried within one renewal interval only: the next tick tries again, and the claim
        # keeping that shares this thread must not wait half a minute behind a failing tick.
        owned, draining, share = self.db.write(
            lambda conn: self._tick_in(conn, busy_slots, was_draining),
            retry_for_s=self.settings.renew_interval_ms / 1000,
        )
        with self._lock:
            self._owned = owned
            self._draining = draining
            self._valid_until = started + self.settings.lease_duration_ms / 1000 * _LOCAL_SAFETY
        if len(owned) - len(draining) == share:
            self.settled.set()
        else:
            self.settled.clear()
        if owned != before:
            self._emit("leases_changed", slots=sorted(owned), lost=sorted(set(before) - set(owned)))

    def leave(self) -> None:
        """Release every lease and deregister: the others take over on their next tick."""
        with self._lock:
            self._valid_until = 0.0
        self.settled.clear()
        params = self._params | {"id": self.member_id, "slots": list(range(self.settings.slots))}

        def _leave(conn: Connection) -> None:
            conn.execute(lq.release_leases, q.params(params))
            conn.execute(lq.delete_subscriber, q.params(params))

        self.db.write(_leave)
        with self._lock:
            self._owned = {}
        self._emit("left")

    # --- the rebalance ------------------------------------------------------------------------

    def _tick_in(
        self, conn: Connection, busy: set[int], was_draining: set[int]
    ) -> tuple[dict[int, int], set[int], int]:
        s = self.settings
        params = self._params | {
            "id": self.member_id,
            "lease_ms": s.lease_duration_ms,
            "stale_ms": s.heartbeat_stale_ms,
            "purge_after_ms": s.purge_after_ms,
        }
        if conn.execute(lq.mark_heartbeat, q.params(params)).rowcount == 0:
            # Purged while paused for longer than purge_after_ms: register again.
            host = self.member_id.partition(":")[0]
            conn.execute(
                lq.insert_subscriber, q.params(params | {"host": host, "pid": os.getpid()})
            )
        conn.execute(lq.renew_leases, q.params(params))
        members = [r.id for r in conn.execute(lq.select_live_members, q.params(params))]
        rank = members.index(self.member_id) if self.member_id in members else len(members)
        share = _fair_share(s.slots, max(len(members), rank + 1), rank)
        rows = conn.execute(lq.select_leases, q.params(params)).all()
        mine = {r.slot: r.epoch for r in rows if r.owner == self.member_id and r.expires_at > r.now}
        free = [r.slot for r in rows if r.owner == "" or r.expires_at < r.now]
        draining: set[int] = set()
        if len(mine) > share:
            extra = sorted(mine)[share:]
            # Two steps: a slot first stops being fetched from (draining), and is released on
            # a later tick once nothing fetched from it is still being processed. A fetch that
            # was already under way when draining began has finished by then, so nothing of
            # that slot is processed here while the next owner starts on the same partitions.
            idle = [slot for slot in extra if slot in was_draining and slot not in busy]
            if idle:
                conn.execute(lq.release_leases, q.params(params | {"slots": idle}))
                for slot in idle:
                    del mine[slot]
            draining = set(extra) - set(idle)
        elif len(mine) < share and free:
            wanted = secrets.SystemRandom().sample(free, min(len(free), share - len(mine)))
            conn.execute(lq.acquire_leases, q.params(params | {"slots": wanted}))
            rows = conn.execute(lq.select_leases, q.params(params)).all()
            mine = {r.slot: r.epoch for r in rows if r.owner == self.member_id}
        if secrets.randbelow(20) == 0:  # housekeeping, not needed on every tick
            conn.execute(lq.purge_dead_subscribers, q.params(params))
            conn.execute(lq.clear_dead_leases, q.params(params))
        return mine, draining, share

    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, topic=self.topic, group=self.group, member=self.member_id, **data)


def _fair_share(slots: int, members: int, rank: int) -> int:
    """Slots the member at ``rank`` should hold: the shares of all ranks sum to ``slots``."""
    return slots // members + (1 if rank < slots % members else 0)
