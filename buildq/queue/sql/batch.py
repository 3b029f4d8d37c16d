"""Settling many deliveries, and publishing what their steps wrote, in one transaction.

``SqlCommitter.commit(steps)`` is the worker's hand-off. Whatever the batch's size it costs:

1. one SELECT of the leases the batch's members hold, with the database's clock: the fence
   (a plain read: no lock on ``queue_leases``);
2. one DELETE of the acked claims, each fenced by its attempt; if some were no longer ours the
   transaction starts over, first asking which (rare: a claim that timed out);
3. one UPDATE per nack, reject, deferral or hand-back (failures are rare);
4. the application's writes (``apply``: the orchestrator's one UPDATE of the build rows);
5. one multi-row INSERT of every message the steps published (all topics), and one
   ``INSERT … SELECT`` giving each consumer group its deliveries of them;
6. one COMMIT.

A fenced-out step is ``LOST`` (nothing of it is written) and does not sink the others; any
other failure rolls the whole batch back and raises, and the worker splits it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Connection

from buildq.queue.contract import (
    Ack,
    Action,
    BufferedOutbox,
    Defer,
    Effect,
    HandBack,
    Nack,
    PublishResult,
    QueueError,
    Reject,
    Settled,
    Step,
)
from buildq.queue.sql import batch_queries as bq
from buildq.queue.sql import queries as q
from buildq.queue.sql.claims import inflight_attempts
from buildq.queue.sql.delivery import SqlDelivery, sql_delivery
from buildq.queue.sql.messages import check_topic, new_publish_token
from buildq.storage.dialect import first_inserted_seq

if TYPE_CHECKING:
    from buildq.queue.sql.queue import SqlQueue


@dataclass(slots=True)
class SqlSession:
    """The batch's transaction, for stores that write in it, and the database's clock."""

    connection: Connection
    now_ms: int


@dataclass(slots=True)
class AckedStep:
    """An ack that will commit: its effect is run by ``apply`` and publishes to ``outbox``."""

    delivery: SqlDelivery
    effect: Effect | None
    outbox: BufferedOutbox = field(default_factory=BufferedOutbox)


#: Runs the acked steps' effects inside the batch (and writes whatever else they wrote).
Apply = Callable[[SqlSession, Sequence[AckedStep]], None]


def run_effects(session: SqlSession, steps: Sequence[AckedStep]) -> None:
    """The queue's own ``apply``: each effect gets its step's outbox."""
    for step in steps:
        if step.effect is not None:
            step.effect(step.outbox)


class _Fenced(Exception):
    """Some acked claims were no longer ours: start over, telling which first."""


class SqlCommitter:
    """A ``Committer`` over one SQL queue."""

    def __init__(self, queue: SqlQueue, apply: Apply = run_effects) -> None:
        self._queue = queue
        self._db = queue.db
        self._apply = apply

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        deliveries = [sql_delivery(step.delivery) for step in steps]
        for delivery in deliveries:
            if not delivery.lost:
                delivery._subscription.begin_settle(delivery)
        try:
            try:
                results, published = self._run(steps, deliveries, identify=False)
            except _Fenced:
                results, published = self._run(steps, deliveries, identify=True)
        except BaseException:
            for delivery in deliveries:
                delivery._subscription.reopen(delivery)
            raise
        for delivery, result in zip(deliveries, results, strict=True):
            if result is Settled.DONE:
                delivery._subscription.settled(delivery)
            else:
                delivery._subscription.forget(delivery)
        for topic, topic_results in published.items():
            self._queue.published(topic, topic_results)
        if published:
            self._queue.notify(set(published))
        return results

    def _run(
        self, steps: Sequence[Step], deliveries: list[SqlDelivery], *, identify: bool
    ) -> tuple[list[Settled], dict[str, list[PublishResult]]]:
        with self._db.begin() as conn:
            results: list[Settled | None] = [Settled.LOST if d.lost else None for d in deliveries]
            now_ms = _fence(conn, deliveries, results)
            if identify:
                _identify(conn, deliveries, results)
            acked = [i for i, s in enumerate(steps) if results[i] is None and _is_ack(s.action)]
            _delete_acked(conn, [deliveries[i] for i in acked])
            for i, (step, delivery) in enumerate(zip(steps, deliveries, strict=True)):
                if results[i] is None and not _is_ack(step.action):
                    results[i] = _settle(conn, delivery, step.action)
            pending = [AckedStep(deliveries[i], _effect(steps[i].action)) for i in acked]
            self._apply(SqlSession(conn, now_ms), pending)
            published = _publish(conn, self._queue, pending, now_ms)
        return [r or Settled.DONE for r in results], published


def _fence(conn: Connection, deliveries: list[SqlDelivery], results: list[Settled | None]) -> int:
    """Mark ``LOST`` the deliveries whose lease moved since they were fetched; the database's
    now (0 if this batch holds no lease any more, when nothing will be written anyway)."""
    owners: dict[str, set[str]] = defaultdict(set)
    for delivery in deliveries:
        owners[delivery.group].add(delivery._subscription.member_id)
    held: dict[tuple[str, str, int], tuple[str, int]] = {}
    now_ms = 0
    for group, members in owners.items():
        params = {"grp": group, "owners": sorted(members)}
        for row in conn.execute(bq.select_member_leases, q.params(params)):
            held[(group, row.topic, int(row.slot))] = (row.owner, int(row.epoch))
            now_ms = int(row.now)
    for i, delivery in enumerate(deliveries):
        holder = held.get((delivery.group, delivery.topic, delivery.slot))
        if holder != (delivery._subscription.member_id, delivery.epoch):
            results[i] = Settled.LOST
    return now_ms


def _identify(
    conn: Connection, deliveries: list[SqlDelivery], results: list[Settled | None]
) -> None:
    """Mark ``LOST`` the deliveries whose claim is no longer in flight at their attempt."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, delivery in enumerate(deliveries):
        if results[i] is None:
            by_group[delivery.group].append(i)
    for group, indexes in by_group.items():
        held = inflight_attempts(conn, group, [deliveries[i].offset for i in indexes])
        for i in indexes:
            if held.get(deliveries[i].offset) != deliveries[i].attempt:
                results[i] = Settled.LOST


def _delete_acked(conn: Connection, acked: list[SqlDelivery]) -> None:
    by_group: dict[str, list[SqlDelivery]] = defaultdict(list)
    for delivery in acked:
        by_group[delivery.group].append(delivery)
    sql = bq.BatchSql.of(conn.dialect)
    for group, claims in by_group.items():
        deleted = sql.delete_acked(conn, group, [(d.offset, d.attempt) for d in claims])
        if deleted != len(claims):
            raise _Fenced


def _settle(conn: Connection, delivery: SqlDelivery, action: Action) -> Settled:
    sub = delivery._subscription
    if isinstance(action, Nack):
        done = sub.nack_claim_in(conn, delivery, action.delay_ms, action.error)
    elif isinstance(action, Reject):
        done = sub.reject_claim_in(conn, delivery, action.reason)
    elif isinstance(action, Defer):
        done = sub.defer_claim_in(conn, delivery, action.delay_ms)
    elif isinstance(action, HandBack):
        done = sub.hand_back_claim_in(conn, delivery)
    else:  # pragma: no cover (acks are deleted together)
        raise QueueError(f"unknown action {action!r}")
    return Settled.DONE if done else Settled.LOST


def _publish(
    conn: Connection, queue: SqlQueue, steps: Sequence[AckedStep], now_ms: int
) -> dict[str, list[PublishResult]]:
    """Insert every message the steps published, in one statement (per 500), and fan them
    out. Rows go in one order (topic, key, id) in every transaction: two batches inserting
    the same identities cannot deadlock on the unique key."""
    token = new_publish_token()
    encode = queue.store.encode_message
    rows: dict[tuple[str, str, str], tuple[Any, ...]] = {}
    checked: set[str] = set()
    for step in steps:
        for topic, message, delay_ms in step.outbox.messages:
            if topic not in checked:
                check_topic(topic)
                checked.add(topic)
            key, ident, hashed, payload, metadata = encode(message)
            visible_after = now_ms + delay_ms if delay_ms > 0 else 0
            # The first of one identity in a batch is published; a later one is a duplicate.
            rows.setdefault(
                (topic, key, ident),
                (topic, key, ident, hashed, payload, metadata, visible_after, now_ms, token),
            )
    if not rows:
        return {}
    ordered = [rows[k] for k in sorted(rows)]
    sql = bq.BatchSql.of(conn.dialect)
    fresh: set[tuple[str, str, str]] = set()
    for start in range(0, len(ordered), bq.MAX_ROWS_PER_INSERT):
        chunk = ordered[start : start + bq.MAX_ROWS_PER_INSERT]
        flat = tuple(value for row in chunk for value in row)
        result = conn.exec_driver_sql(sql.insert_messages(len(chunk)), flat)
        inserted = result.rowcount
        if not inserted:
            continue
        first = first_inserted_seq(conn.dialect, int(result.lastrowid), inserted)
        params = q.params({"first_seq": first, "publish_token": token})
        conn.execute(bq.fan_out_inserted, params)
        if inserted == len(chunk):
            fresh.update((r[0], r[1], r[2]) for r in chunk)
        else:
            fresh.update(tuple(r) for r in conn.execute(bq.select_inserted_ids, params))
    published: dict[str, list[PublishResult]] = defaultdict(list)
    for step in steps:
        for topic, message, _delay in step.outbox.messages:
            identity = (topic, message.partition_key, message.id)
            published[topic].append(
                PublishResult(message.id, message.partition_key, identity not in fresh)
            )
            fresh.discard(identity)  # a second message of one identity is a duplicate
    return dict(published)


def _is_ack(action: Action) -> bool:
    return isinstance(action, Ack)


def _effect(action: Action) -> Effect | None:
    return action.effect if isinstance(action, Ack) else None
