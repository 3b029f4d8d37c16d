"""A consumer group member on one topic: claims deliveries, keeps the claims alive, settles.

``fetch`` claims due deliveries of the slots this member leases in one short transaction
(``SELECT … FOR UPDATE`` on the fetch index, then an update by primary key; see queries.claim_due
for why not SKIP LOCKED).
Every later write about a delivery (ack, nack, reject, extend) is conditional on the claim
still being current (same attempt, in flight) *and* on the member still holding the slot's
lease at the same epoch (read without a lock); otherwise it is refused with ``DeliveryLost``
and the message goes to whoever owns it now.

Until a delivery is settled, the lease thread keeps its claim alive (``claims.ClaimKeeper``,
which also renews the member's leases); the delivery itself is in ``delivery``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy.engine import Connection

from buildq.queue.contract import (
    AlreadyAcknowledged,
    Delivery,
    DeliveryLost,
    Message,
)
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import batch_queries as bq
from buildq.queue.sql import lease_queries as lq
from buildq.queue.sql import queries as q
from buildq.queue.sql.claims import ClaimKeeper
from buildq.queue.sql.delivery import ClaimState, SqlDelivery
from buildq.queue.sql.leases import EventHook, Membership
from buildq.queue.sql.messages import (
    MessageStore,
    check_group_name,
    dead_letter_of,
    decode_metadata,
)
from buildq.storage.database import Database


class SqlSubscription:
    def __init__(
        self,
        store: MessageStore,
        topic: str,
        group: str,
        settings: SubscriptionSettings,
        *,
        member_id: str | None = None,
        on_event: EventHook | None = None,
    ) -> None:
        check_group_name(group)
        self.store = store
        self.db: Database = store.db
        self.settings = settings
        self.membership = Membership(
            store.db, topic, group, settings, member_id=member_id, on_event=on_event
        )
        self._wake = threading.Event()
        self._on_event = on_event
        self.claims = ClaimKeeper(self.membership, self._emit)

    @property
    def topic(self) -> str:
        return self.membership.topic

    @property
    def group(self) -> str:
        return self.membership.group

    @property
    def member_id(self) -> str:
        return self.membership.member_id

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> SqlSubscription:
        self.membership.join()
        self.claims.start()
        return self

    def close(self) -> None:
        """Hand back what was fetched but not settled, release leases, deregister."""
        self._wake.set()
        self.claims.stop()
        self.hand_back(self.claims.unsettled())
        self.membership.leave()

    def problem(self) -> str | None:
        """Why this member cannot work now: its leases have not been renewed for over a
        renewal interval (the database refuses writes: down, or a full disk)."""
        return self.claims.problem()

    def wait_for_leases(self, timeout_s: float) -> bool:
        """Wait until this member holds its fair share of the topic's slots."""
        return self.membership.settled.wait(timeout_s)

    # --- fetching ---------------------------------------------------------------------------

    def fetch(self, limit: int) -> list[SqlDelivery]:
        slots = self.membership.usable_slots()
        if not slots or limit <= 0:
            return []
        with self.claims.claiming(slots):
            rows = self.db.write(lambda conn: self._claim_in(conn, slots, limit))
            claimed_until = time.monotonic() + self.settings.visibility_timeout_ms / 1000
            fetched = [self._delivery(row, slots, claimed_until) for row in rows]
            self.claims.track(fetched)
        return fetched

    def _claim_in(self, conn: Connection, epochs: dict[int, int], limit: int) -> list[Any]:
        params = {"grp": self.group, "topic": self.topic, "slots": sorted(epochs), "limit": limit}
        due = {
            int(seq): (int(at), int(slot))
            for seq, at, slot in conn.execute(q.claim_due, q.params(params))
        }
        if due:
            # Fenced like every later write: only from slots this member still leases at the
            # epoch it fetched under, with a renewal's time left. A claim that waited on a lock
            # (a paused member's, a slow transaction's) would otherwise take deliveries whose
            # lease moved meanwhile, process them (a trigger!) and then have its ack refused.
            fence = params | {"owner": self.member_id, "margin_ms": self.settings.renew_interval_ms}
            held = {
                (int(r.slot), int(r.epoch))
                for r in conn.execute(lq.select_held_leases, q.params(fence))
            }
            due = {seq: v for seq, v in due.items() if (v[1], epochs[v[1]]) in held}
        seqs = list(due)
        if not seqs:
            return []
        claim = params | {
            "seqs": seqs,
            "owner": self.member_id,
            "visibility_timeout_ms": self.settings.visibility_timeout_ms,
        }
        conn.execute(q.mark_claimed, q.params(claim))
        rows = conn.execute(q.select_claimed, q.params(claim)).mappings().all()
        live = []
        for row in rows:
            if row["retry_count"] >= self.settings.max_attempts:
                error = row["delivery_error"] or "visibility timeout expired"
                self.store.move_to_dlq_in(
                    conn,
                    topic=self.topic,
                    group=self.group,
                    offset=row["seq"],
                    failure_count=row["retry_count"],
                    error=error,
                )
            else:
                # Due since visible_at; 0 means since published (as stats_queries._READY_SINCE).
                live.append(dict(row, due_at=due[int(row["seq"])][0] or row["created_at"]))
        return live

    def _delivery(self, row: Any, epochs: dict[int, int], claimed_until: float) -> SqlDelivery:
        dead = dead_letter_of(row)
        message = Message(
            id=row["message_id"],
            payload=bytes(row["payload"]),
            partition_key=row["partition_key"],
            metadata=decode_metadata(row["metadata"]),
        )
        return SqlDelivery(
            topic=self.topic,
            group=self.group,
            message=message,
            offset=int(row["seq"]),
            attempt=int(row["attempt"]),
            retry_count=int(row["retry_count"]),
            dead_letter=dead,
            slot=int(row["slot"]),
            epoch=epochs[int(row["slot"])],
            last_error=row["delivery_error"] or "",
            _subscription=self,
            due_at_ms=int(row["due_at"]),
            delivered_at_ms=int(row["delivered_at"]),
            claimed_until=claimed_until,
        )

    def next_due_ms(self) -> int | None:
        """Milliseconds until this member's next delivery is due (<= 0: now), None if none."""
        slots = self.membership.usable_slots()
        if not slots:
            return None
        params = {"grp": self.group, "topic": self.topic, "slots": sorted(slots)}
        value = self.db.read(
            lambda conn: conn.execute(q.select_next_due, q.params(params)).scalar()
        )
        return None if value is None else int(value)

    def wait(self, timeout_s: float) -> bool:
        """Sleep until woken by a local publish or ``timeout_s``; True if woken."""
        woken = self._wake.wait(timeout_s)
        self._wake.clear()
        return woken

    def wake(self) -> None:
        self._wake.set()

    # --- settling -------------------------------------------------------------------------------

    def settle(self, delivery: SqlDelivery, write: Any) -> None:
        """Run one settling write in its own transaction."""
        self._check_open(delivery)
        self.db.write(write)
        self.settled(delivery)

    def _check_open(self, delivery: SqlDelivery) -> None:
        if delivery._state is ClaimState.LOST:
            raise DeliveryLost(f"the claim of {delivery.message.id!r} is no longer ours")
        if delivery._state is not ClaimState.OPEN:
            raise AlreadyAcknowledged(
                f"delivery of {delivery.message.id!r} (attempt {delivery.attempt}) "
                "was already settled"
            )

    def begin_settle(self, delivery: SqlDelivery) -> None:
        """Mark a delivery settled by a transaction that has not committed yet."""
        self._check_open(delivery)
        delivery.mark(ClaimState.PENDING)

    def settled(self, delivery: SqlDelivery) -> None:
        delivery.mark(ClaimState.SETTLED)
        self.claims.drop(delivery)

    def reopen(self, delivery: SqlDelivery) -> None:
        """The transaction that would have settled it rolled back."""
        if delivery._state is ClaimState.PENDING:
            delivery.mark(ClaimState.OPEN)

    def forget(self, delivery: SqlDelivery) -> None:
        """The delivery is lost to this member (fenced): stop tracking it."""
        self.claims.forget(delivery)

    def abandon(self, deliveries: Sequence[Delivery]) -> None:
        """Stop keeping these claims alive; the visibility timeout brings them back."""
        for delivery in deliveries:
            if isinstance(delivery, SqlDelivery) and delivery._state is not ClaimState.SETTLED:
                self.forget(delivery)

    def _claim(self, delivery: SqlDelivery) -> dict[str, Any]:
        return {"seq": delivery.offset, "grp": self.group, "attempt": delivery.attempt}

    def _fence_in(self, conn: Connection, delivery: SqlDelivery, action: str) -> None:
        """Refuse if the slot's lease moved since the delivery was fetched (a plain read: the
        lease row is not locked, so this cannot deadlock with the renewal)."""
        params = {"grp": self.group, "topic": self.topic, "slot": delivery.slot}
        holder = conn.execute(bq.select_lease_holder, q.params(params)).first()
        if holder is None or holder.owner != self.member_id or holder.epoch != delivery.epoch:
            raise self._refused(delivery, action)

    def _refused(self, delivery: SqlDelivery, action: str) -> DeliveryLost:
        self.forget(delivery)
        return DeliveryLost(
            f"{action} of {delivery.message.id!r} refused: this member no longer owns the "
            f"delivery (lease of slot {delivery.slot} moved or the delivery timed out)"
        )

    def ack_in(self, conn: Connection, delivery: SqlDelivery) -> None:
        self._fence_in(conn, delivery, "ack")
        if conn.execute(bq.settle_ack, q.params(self._claim(delivery))).rowcount == 0:
            raise self._refused(delivery, "ack")

    def nack_in(
        self, conn: Connection, delivery: SqlDelivery, requeue_after_ms: int | None, error: str
    ) -> None:
        self._fence_in(conn, delivery, "nack")
        if not self.nack_claim_in(conn, delivery, requeue_after_ms, error):
            raise self._refused(delivery, "nack")

    def nack_claim_in(
        self, conn: Connection, delivery: SqlDelivery, requeue_after_ms: int | None, error: str
    ) -> bool:
        """Nack (dead-lettering at max_attempts) if the claim is still ours; False if not."""
        delay = requeue_after_ms
        if delay is None:
            delay = self.settings.backoff.delay_ms(delivery.retry_count)
        params = self._claim(delivery) | {"delay_ms": max(0, delay), "error": error[:10_000]}
        if conn.execute(bq.settle_nack, q.params(params)).rowcount == 0:
            return False
        if delivery.retry_count + 1 >= self.settings.max_attempts:
            self._dead_letter_in(conn, delivery, delivery.retry_count + 1, error or "failed")
        return True

    def reject_in(self, conn: Connection, delivery: SqlDelivery, reason: str) -> None:
        self._fence_in(conn, delivery, "reject")
        if not self.reject_claim_in(conn, delivery, reason):
            raise self._refused(delivery, "reject")

    def reject_claim_in(self, conn: Connection, delivery: SqlDelivery, reason: str) -> bool:
        """Move to the DLQ now if the claim is still ours; False if not."""
        params = self._claim(delivery) | {"delay_ms": 0, "error": reason[:10_000]}
        if conn.execute(bq.settle_nack, q.params(params)).rowcount == 0:
            return False
        self._dead_letter_in(conn, delivery, delivery.retry_count + 1, reason or "rejected")
        return True

    def defer_claim_in(self, conn: Connection, delivery: SqlDelivery, delay_ms: int) -> bool:
        """Deliver again after ``delay_ms`` without counting a retry; False if not ours."""
        params = self._claim(delivery) | {"delay_ms": max(0, delay_ms)}
        return bool(conn.execute(bq.settle_defer, q.params(params)).rowcount)

    def hand_back_claim_in(self, conn: Connection, delivery: SqlDelivery) -> bool:
        """Back to its place in the fetch order, no retry counted; False if not ours."""
        return bool(conn.execute(bq.settle_hand_back, q.params(self._claim(delivery))).rowcount)

    def _dead_letter_in(
        self, conn: Connection, delivery: SqlDelivery, failures: int, error: str
    ) -> None:
        self.store.move_to_dlq_in(
            conn,
            topic=self.topic,
            group=self.group,
            offset=delivery.offset,
            failure_count=failures,
            error=error,
        )

    def extend(self, delivery: SqlDelivery, ms: int) -> None:
        self._check_open(delivery)

        def extend_in(conn: Connection) -> int:
            self._fence_in(conn, delivery, "extend_visibility")
            params = self._claim(delivery) | {"extend_ms": max(0, ms)}
            return int(conn.execute(bq.extend_claim, q.params(params)).rowcount)

        if self.db.write(extend_in) == 0:
            raise self._refused(delivery, "extend_visibility")
        delivery.claimed_until = time.monotonic() + max(0, ms) / 1000

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Return unprocessed deliveries without counting a retry (shutdown, rebalance)."""
        mine = [d for d in deliveries if isinstance(d, SqlDelivery) and d._state is ClaimState.OPEN]
        if not mine:
            return
        rows = q.many([self._claim(d) for d in mine])
        self.db.write(lambda conn: conn.execute(bq.settle_hand_back, rows))
        for delivery in mine:
            self.settled(delivery)

    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, topic=self.topic, group=self.group, member=self.member_id, **data)
