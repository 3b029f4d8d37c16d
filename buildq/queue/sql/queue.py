"""The SQL queue: publisher, atomic transactions, and the factory for subscriptions."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from sqlalchemy.engine import Connection

from buildq.queue.contract import (
    Delivery,
    Message,
    PublisherClosed,
    PublishResult,
)
from buildq.queue.settings import DEFAULT_MAX_PAYLOAD_BYTES, SubscriptionSettings
from buildq.queue.sql.batch import Apply, SqlCommitter, run_effects
from buildq.queue.sql.delivery import SqlDelivery, sql_delivery
from buildq.queue.sql.leases import EventHook
from buildq.queue.sql.messages import MessageStore
from buildq.queue.sql.subscription import SqlSubscription
from buildq.storage.database import Database

log = structlog.get_logger("buildq.queue")

#: Called after a publish commits, with the topic and one result per message (duplicates
#: included, flagged): for metrics. Errors it raises are logged, never the publisher's.
PublishHook = Callable[[str, Sequence[PublishResult]], None]


class SqlTransaction:
    """Writes that commit together. ``connection`` lets other stores join the transaction."""

    def __init__(self, queue: SqlQueue, conn: Connection) -> None:
        self._queue = queue
        self.connection = conn
        self._settling: list[SqlDelivery] = []
        self._published: list[tuple[str, list[PublishResult]]] = []

    def publish(self, topic: str, message: Message) -> PublishResult:
        return self.publish_many(topic, [message])[0]

    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult:
        return self.publish_many(topic, [message], delay_ms)[0]

    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]:
        self._queue.check_open()
        store = self._queue.store
        rows = store.encode(topic, messages)
        results = store.insert_rows_in(self.connection, topic, rows, delay_ms=delay_ms)
        self._published.append((topic, results))
        _log_duplicates(topic, results)
        return results

    def ack(self, delivery: Delivery) -> None:
        claim = self._settling_one(delivery)
        claim._subscription.ack_in(self.connection, claim)

    def nack(
        self, delivery: Delivery, requeue_after_ms: int | None = None, error: str = ""
    ) -> None:
        claim = self._settling_one(delivery)
        claim._subscription.nack_in(self.connection, claim, requeue_after_ms, error)

    def reject(self, delivery: Delivery, reason: str) -> None:
        claim = self._settling_one(delivery)
        claim._subscription.reject_in(self.connection, claim, reason)

    def _settling_one(self, delivery: Delivery) -> SqlDelivery:
        claim = sql_delivery(delivery)
        claim._subscription.begin_settle(claim)
        self._settling.append(claim)
        return claim

    def committed(self) -> None:
        for delivery in self._settling:
            delivery._subscription.settled(delivery)
        for topic, results in self._published:
            self._queue.published(topic, results)
        self._queue.notify({topic for topic, _ in self._published})

    def rolled_back(self) -> None:
        for delivery in self._settling:
            delivery._subscription.reopen(delivery)


class SqlQueue:
    """Publisher and subscription factory over one database."""

    def __init__(
        self,
        db: Database,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        on_published: PublishHook | None = None,
        owns_db: bool = False,
    ) -> None:
        self.db = db
        # A queue made by buildq.queue.open is the only holder of its engine: closing it must
        # release the pool's connections, or an embedding program leaks one pool per open.
        self._owns_db = owns_db
        self._on_published = on_published
        self.store = MessageStore(db, max_payload_bytes=max_payload_bytes)
        self._closed = False
        self._lock = threading.Lock()
        self._subscriptions: dict[str, list[SqlSubscription]] = {}

    def check_open(self) -> None:
        if self._closed:
            raise PublisherClosed("the publisher is closed")

    def publish(self, topic: str, message: Message) -> PublishResult:
        return self.publish_many(topic, [message])[0]

    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult:
        return self.publish_many(topic, [message], delay_ms)[0]

    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]:
        self.check_open()
        rows = self.store.encode(topic, messages)
        results = self.db.write(
            lambda conn: self.store.insert_rows_in(conn, topic, rows, delay_ms=delay_ms)
        )
        _log_duplicates(topic, results)
        self.published(topic, results)
        self.notify({topic})
        return results

    def published(self, topic: str, results: Sequence[PublishResult]) -> None:
        """Tell the ``on_published`` hook about a committed publish."""
        if self._on_published is None:
            return
        try:
            self._on_published(topic, results)
        except Exception:  # the messages are committed: a hook must not turn that into an error
            log.exception("publish_hook_failed", topic=topic)

    @contextmanager
    def transaction(self) -> Iterator[SqlTransaction]:
        """``with queue.transaction() as tx: tx.publish_after(...); tx.ack(d)``: both or neither.

        Not retried automatically: on TransientQueueError the caller decides (the consumer
        framework runs the whole step again).
        """
        self.check_open()
        tx: SqlTransaction | None = None
        try:
            with self.db.begin() as conn:
                tx = SqlTransaction(self, conn)
                yield tx
        except BaseException:
            if tx is not None:
                tx.rolled_back()
            raise
        tx.committed()

    def run_in_transaction(self, step: Callable[[SqlTransaction], Any]) -> Any:
        """Run ``step`` in a transaction, running it again on transient errors."""
        return self.db.retrying(lambda: self._once(step))

    def _once(self, step: Callable[[SqlTransaction], Any]) -> Any:
        with self.transaction() as tx:
            return step(tx)

    def committer(self, apply: Apply = run_effects) -> SqlCommitter:
        """The worker's hand-off: settles a batch of steps in one transaction. ``apply`` runs
        the acked steps' effects; the default gives each its outbox, and a store that writes in
        the same transaction passes its own (the orchestrator's build store does)."""
        return SqlCommitter(self, apply)

    def subscribe(
        self,
        topic: str,
        group: str,
        settings: SubscriptionSettings | None = None,
        *,
        member_id: str | None = None,
        on_event: EventHook | None = None,
    ) -> SqlSubscription:
        """Join ``group`` on ``topic`` (creating the group if new) and start renewing leases."""
        self.check_open()
        subscription = SqlSubscription(
            self.store,
            topic,
            group,
            settings or SubscriptionSettings(),
            member_id=member_id,
            on_event=on_event,
        ).start()
        with self._lock:
            self._subscriptions.setdefault(topic, []).append(subscription)
        return subscription

    def unsubscribe(self, subscription: SqlSubscription) -> None:
        with self._lock:
            members = self._subscriptions.get(subscription.topic, [])
            if subscription in members:
                members.remove(subscription)
        subscription.close()

    def notify(self, topics: set[str]) -> None:
        """Wake this process's fetchers of topics that just got messages."""
        with self._lock:
            woken = [s for t in topics for s in self._subscriptions.get(t, [])]
        for subscription in woken:
            subscription.wake()

    def expedite(self, topic: str, partition_key: str) -> int:
        changed = self.store.expedite(topic, partition_key)
        if changed:
            self.notify({topic})
        return changed

    def close(self) -> None:
        """Stop publishing (and release the database when ``open`` made it). Subscriptions are
        closed by whoever opened them."""
        self._closed = True
        if self._owns_db:
            self.db.dispose()


def _log_duplicates(topic: str, results: list[PublishResult]) -> None:
    for result in results:
        if result.duplicate:
            log.debug(
                "publish_duplicate",
                topic=topic,
                partition_key=result.partition_key,
                message_id=result.message_id,
            )
