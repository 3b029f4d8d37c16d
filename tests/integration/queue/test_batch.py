"""The batched hand-off (``SqlQueue.committer()``) and claims kept alive, on both backends."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from buildq.queue.contract import (
    Ack,
    DeliveryLost,
    Message,
    Nack,
    Outbox,
    Settled,
    Step,
    TransientQueueError,
)
from buildq.queue.sql import SqlQueue, SqlSubscription
from buildq.queue.sql.schema import deliveries, leases, messages
from buildq.storage.database import Database
from tests.support.database import FAST
from tests.support.waiting import wait_until


def msg(i: int, key: str | None = None) -> Message:
    return Message(id=f"m/{i}", payload=b"{}", partition_key=key or f"k{i}")


@contextmanager
def statements(db: Database) -> Iterator[list[str]]:
    """The statements this process sends while the block runs (BEGIN on SQLite included)."""
    sent: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        sent.append(statement.split(None, 1)[0].upper())

    event.listen(db.engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(db.engine, "before_cursor_execute", record)


def next_poll(topic: str, message: Message) -> Callable[[Outbox], None]:
    def effect(outbox: Outbox) -> None:
        outbox.publish_after(topic, Message(f"{message.id}/next", b"{}", message.partition_key), 50)

    return effect


def fetch_all(sub: SqlSubscription, count: int) -> list[Any]:
    got: list[Any] = []
    wait_until(lambda: got.extend(sub.fetch(count - len(got))) or len(got) >= count, timeout=10)
    return got


@pytest.mark.parametrize("size", [5, 60])
def test_a_batch_costs_the_same_statements_whatever_its_size(
    queue: SqlQueue, db: Database, subscribe: Any, size: int
) -> None:
    sub = subscribe("t", settings=dataclasses.replace(FAST, batch_size=100))
    queue.publish_many("t", [msg(i) for i in range(size)])
    fetched = fetch_all(sub, size)
    steps = [Step(d, Ack(next_poll("t", d.message))) for d in fetched]
    with statements(db) as sent:
        results = queue.committer().commit(steps)
    assert results == [Settled.DONE] * size
    # The lease fence, one DELETE of the acks, one INSERT of every message, one fan-out.
    assert [s for s in sent if s != "BEGIN"] == ["SELECT", "DELETE", "INSERT", "INSERT"]
    assert count_rows(db, deliveries) == size  # the acked are gone, the next ones are there
    assert count_rows(db, messages, messages.c.message_id.like("%/next")) == size


def test_a_fenced_out_delivery_is_lost_and_does_not_sink_the_batch(
    queue: SqlQueue, db: Database, subscribe: Any
) -> None:
    sub = subscribe("t")
    queue.publish_many("t", [msg(i) for i in range(3)])
    first, second, third = fetch_all(sub, 3)
    # The second claim timed out and was taken again meanwhile (its attempt moved on).
    db.write(
        lambda c: c.execute(
            sa.update(deliveries)
            .where(deliveries.c.seq == second.offset)
            .values(attempt=deliveries.c.attempt + 1)
        )
    )
    steps = [Step(d, Ack(next_poll("t", d.message))) for d in (first, second, third)]
    results = queue.committer().commit(steps)
    assert results == [Settled.DONE, Settled.LOST, Settled.DONE]
    assert second.lost
    nexts = {
        r
        for (r,) in rows(
            db, sa.select(messages.c.message_id).where(messages.c.message_id.like("%/next"))
        )
    }
    assert nexts == {"m/0/next", "m/2/next"}  # nothing of the lost step was written
    with pytest.raises(DeliveryLost):
        second.ack()


def test_a_failing_batch_writes_nothing_and_can_be_retried(
    queue: SqlQueue, db: Database, subscribe: Any
) -> None:
    sub = subscribe("t")
    queue.publish_many("t", [msg(i) for i in range(2)])
    first, second = fetch_all(sub, 2)

    def broken(_outbox: Outbox) -> None:
        raise RuntimeError("a bug in an effect")

    committer = queue.committer()
    with pytest.raises(RuntimeError):
        committer.commit(
            [Step(first, Ack(next_poll("t", first.message))), Step(second, Ack(broken))]
        )
    assert count_rows(db, deliveries) == 2  # rolled back: both still claimed
    assert committer.commit([Step(first, Ack()), Step(second, Nack(0, "split"))]) == [
        Settled.DONE,
        Settled.DONE,
    ]
    [again] = fetch_all(sub, 1)
    assert (again.message.id, again.retry_count, again.last_error) == ("m/1", 1, "split")


def test_claims_are_kept_alive_while_work_takes_longer_than_the_timeout(
    queue: SqlQueue, db: Database, subscribe: Any
) -> None:
    settings = dataclasses.replace(FAST, visibility_timeout_ms=400)
    sub = subscribe("t", settings=settings)
    queue.publish("t", msg(1))
    [held] = fetch_all(sub, 1)
    first_until = visible_at(db, held.offset)
    # Three timeouts' worth of extensions: the claim is renewed, never handed to anyone else.
    wait_until(lambda: visible_at(db, held.offset) > first_until + 1_200, timeout=20)
    assert sub.fetch(10) == []
    held.ack()
    assert count_rows(db, deliveries) == 0


def test_a_claim_whose_lease_moved_is_not_kept_and_is_marked_lost(
    queue: SqlQueue, db: Database, subscribe: Any
) -> None:
    sub = subscribe("t", settings=dataclasses.replace(FAST, visibility_timeout_ms=400))
    queue.publish("t", msg(1))
    [held] = fetch_all(sub, 1)
    # Another member takes the slot over (as after a pause longer than the lease).
    db.write(
        lambda c: c.execute(
            sa.update(leases)
            .where(leases.c.topic == "t", leases.c.slot == held.slot)
            .values(owner="someone-else", epoch=leases.c.epoch + 1, expires_at=2**62)
        )
    )
    wait_until(lambda: held.lost, timeout=20, message="the keeper gives the claim up")
    assert queue.committer().commit([Step(held, Ack())]) == [Settled.LOST]


@pytest.mark.mysql
def test_batch_acks_do_not_deadlock_with_the_members_lease_renewal(
    mysql_url: str, tmp_path: Any
) -> None:
    """The fence reads leases without locking them (docs/queue.md, "Locks"): a batch of acks
    over many slots and the renewer, updating the same lease rows every 20 ms, never deadlock."""
    from buildq.storage.database import create_engine

    db = Database(create_engine(mysql_url), retry_for_s=10)
    deadlocks: list[int] = []

    def on_error(context: Any) -> None:
        orig = getattr(context.original_exception, "args", ())
        if orig and orig[0] == 1213:
            deadlocks.append(1)

    event.listen(db.engine, "handle_error", on_error)
    queue = SqlQueue(db)
    settings = dataclasses.replace(
        FAST, renew_interval_ms=20, lease_duration_ms=2_000, slots=16, batch_size=64
    )
    sub = queue.subscribe("t", "g", settings)
    committer = queue.committer()
    try:
        for round_ in range(60):
            queue.publish_many("t", [msg(round_ * 32 + i) for i in range(32)])
            fetched = fetch_all(sub, 32)
            steps = [Step(d, Ack(next_poll("u", d.message))) for d in fetched]
            with contextlib.suppress(TransientQueueError):  # counted below if a deadlock
                assert set(committer.commit(steps)) == {Settled.DONE}
    finally:
        sub.close()
        db.dispose()
    assert deadlocks == []


def visible_at(db: Database, seq: int) -> int:
    stmt = sa.select(deliveries.c.visible_at).where(deliveries.c.seq == seq)
    return int(db.read(lambda c: c.execute(stmt).scalar_one()))


def count_rows(db: Database, table: sa.Table, *where: Any) -> int:
    stmt = sa.select(sa.func.count()).select_from(table).where(*where)
    return int(db.read(lambda c: c.execute(stmt).scalar_one()))


def rows(db: Database, stmt: Any) -> list[Any]:
    return list(db.read(lambda c: c.execute(stmt).all()))
