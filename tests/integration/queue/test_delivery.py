"""Deliveries: ack, nack and backoff, DLQ, groups, visibility, fencing, atomic hand-off."""

from __future__ import annotations

import dataclasses

import pytest
import sqlalchemy as sa

from buildq.queue import AlreadyAcknowledged, DeliveryLost, Message
from buildq.queue.settings import Backoff
from buildq.queue.sql.schema import deliveries, leases, messages
from tests.integration.queue.test_publish import count, msg
from tests.support.database import FAST
from tests.support.waiting import wait_until


def test_ack_is_final(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("a"))
    [d] = sub.fetch(10)
    d.ack()
    assert sub.fetch(10) == []
    assert count(db, deliveries) == 0
    assert count(db, messages) == 1  # the log row stays for other groups and dedup


def test_nack_redelivers_after_the_delay_with_retry_count_plus_one(queue, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("a"))
    [d] = sub.fetch(10)
    d.nack(300, error="boom")
    assert sub.fetch(10) == []
    assert 0 < (sub.next_due_ms() or 0) <= 300
    [again] = wait_until(lambda: sub.fetch(10), timeout=5)
    assert (again.attempt, again.retry_count, again.last_error) == (2, 1, "boom")


def test_nack_without_delay_uses_the_configured_backoff(queue, subscribe):
    settings = dataclasses.replace(
        FAST,
        max_attempts=10,
        backoff=Backoff(initial_ms=200, multiplier=3.0, cap_ms=1_000, jitter=0.0),
    )
    sub = subscribe("t", settings=settings)
    queue.publish("t", msg("a"))
    delays = []
    for _ in range(3):
        [d] = wait_until(lambda: sub.fetch(1), timeout=5)
        d.nack()
        delays.append(sub.next_due_ms())
    # 200, 600, then capped at 1000 (minus the few ms the queries took)
    assert [round((x or 0) / 100) * 100 for x in delays] == [200, 600, 1000]


def test_max_attempts_moves_to_the_dlq_with_its_fields(queue, db, subscribe):
    sub = subscribe("t")  # max_attempts = 3
    dlq = subscribe("t_dlq", group="reaper")
    queue.publish_after("t", msg("poison", payload=b"p", why="x"), 0)
    for attempt in range(3):
        [d] = wait_until(lambda: sub.fetch(1), timeout=5)
        assert d.retry_count == attempt
        d.nack(0, error=f"failure {attempt}")
    assert sub.fetch(10) == []
    assert count(db, deliveries, deliveries.c.topic == "t") == 0
    row = db.read(lambda c: c.execute(sa.select(messages).where(messages.c.topic == "t_dlq")).one())
    assert row.visible_after == 0
    assert (row.original_topic, row.failure_count, row.last_error) == ("t", 3, "failure 2")
    assert row.failed_at > 0 and row.dlq_group == "g"
    [dead] = dlq.fetch(10)
    assert dead.message == msg("poison", payload=b"p", why="x")
    assert dead.dead_letter is not None
    assert dead.dead_letter.original_topic == "t" and dead.dead_letter.failure_count == 3


def test_redelivery_after_visibility_timeout_counts_and_can_reach_the_dlq(queue, db, subscribe):
    settings = dataclasses.replace(FAST, visibility_timeout_ms=100, max_attempts=2)
    sub = subscribe("t", settings=settings)
    queue.publish("t", msg("stuck"))
    [first] = sub.fetch(1)
    # A live member keeps its claims alive; one it gives up on (as a crashed one would) runs
    # out after the visibility timeout.
    sub.abandon([first])
    [second] = wait_until(lambda: sub.fetch(1), timeout=5)
    sub.abandon([second])
    assert (second.attempt, second.retry_count) == (2, 1)
    with pytest.raises(DeliveryLost):
        first.ack()  # the first claim is stale: its ack must not land
    # The third delivery would have retry_count 2 == max_attempts: the claim dead-letters it.
    fetched_after_dlq = []
    assert (
        wait_until(
            lambda: (
                fetched_after_dlq.extend(sub.fetch(1))
                or count(db, messages, messages.c.topic == "t_dlq")
            ),
            timeout=5,
        )
        == 1
    )
    assert fetched_after_dlq == []
    last_error = db.read(
        lambda c: c.execute(
            sa.select(messages.c.last_error).where(messages.c.topic == "t_dlq")
        ).scalar()
    )
    assert "visibility timeout" in last_error


def test_reject_goes_straight_to_the_dlq(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("bad"))
    [d] = sub.fetch(1)
    d.reject("malformed payload: not JSON")
    row = db.read(lambda c: c.execute(sa.select(messages).where(messages.c.topic == "t_dlq")).one())
    assert (row.failure_count, row.last_error, row.visible_after) == (
        1,
        "malformed payload: not JSON",
        0,
    )
    assert sub.fetch(1) == []


def test_moving_to_the_dlq_twice_is_a_no_op(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("m"))
    [d] = sub.fetch(1)
    move = lambda conn: queue.store.move_to_dlq_in(  # noqa: E731
        conn, topic="t", group="g", offset=d.offset, failure_count=1, error="x"
    )
    assert db.write(move) is True
    assert db.write(move) is False
    assert count(db, messages, messages.c.topic == "t_dlq") == 1


def test_two_groups_are_independent_even_across_a_dlq_move(queue, db, subscribe):
    a = subscribe("t", group="a")
    b = subscribe("t", group="b")
    queue.publish("t", msg("m"))
    [da] = a.fetch(1)
    da.reject("a cannot handle it")
    [db_] = b.fetch(1)
    assert db_.message.id == "m" and db_.retry_count == 0
    db_.ack()
    assert count(db, messages, messages.c.topic == "t_dlq", messages.c.dlq_group == "a") == 1
    # Both groups failing the same message leave one dead letter each.
    queue.publish("t", msg("n"))
    a.fetch(1)[0].reject("a")
    b.fetch(1)[0].reject("b")
    assert count(db, messages, messages.c.topic == "t_dlq", messages.c.message_id == "n") == 2


def test_extend_visibility_postpones_redelivery(queue, subscribe):
    settings = dataclasses.replace(FAST, visibility_timeout_ms=200)
    sub = subscribe("t", settings=settings)
    queue.publish("t", msg("long"))
    [d] = sub.fetch(1)
    d.extend_visibility(60_000)
    assert sub.next_due_ms() > 50_000
    assert sub.fetch(1) == []
    d.ack()


def test_acting_twice_raises_already_acknowledged(queue, subscribe):
    sub = subscribe("t")
    queue.publish_many("t", [msg("a"), msg("b")])
    da, db_ = sub.fetch(2)
    da.ack()
    with pytest.raises(AlreadyAcknowledged):
        da.ack()
    with pytest.raises(AlreadyAcknowledged):
        da.nack(0)
    db_.nack(0)
    with pytest.raises(AlreadyAcknowledged):
        db_.reject("x")
    with pytest.raises(AlreadyAcknowledged), queue.transaction() as tx:
        tx.ack(da)


def test_ack_and_publish_after_roll_back_together(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("poll/1"))
    [d] = sub.fetch(1)
    with pytest.raises(RuntimeError), queue.transaction() as tx:
        tx.publish_after("t", msg("poll/2"), 1_000)
        tx.ack(d)
        raise RuntimeError("crash between the writes and the commit")
    assert count(db, messages, messages.c.message_id == "poll/2") == 0
    # The delivery is still ours and still open: it can be acted on again.
    with queue.transaction() as tx:
        assert not tx.publish_after("t", msg("poll/2"), 0).duplicate
        tx.ack(d)
    assert [x.message.id for x in sub.fetch(5)] == ["poll/2"]


def test_a_fenced_ack_rolls_back_the_publish_in_its_transaction(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("poll/1"))
    [d] = sub.fetch(1)
    _steal_all_leases(db)
    with pytest.raises(DeliveryLost), queue.transaction() as tx:
        tx.publish_after("t", msg("poll/2"), 0)
        tx.ack(d)
    assert count(db, messages, messages.c.message_id == "poll/2") == 0


def _steal_all_leases(db):
    db.write(
        lambda c: c.execute(
            sa.update(leases).values(owner="someone-else", epoch=leases.c.epoch + 1)
        )
    )


def test_a_member_that_lost_its_lease_cannot_write(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish_many("t", [msg("a"), msg("b"), msg("c")])
    da, db_, dc = sub.fetch(3)
    _steal_all_leases(db)
    for action in (
        da.ack,
        lambda: db_.nack(0),
        lambda: dc.reject("x"),
        lambda: da.extend_visibility(5),
    ):
        with pytest.raises((DeliveryLost, AlreadyAcknowledged)):
            action()
    assert count(db, deliveries) == 3 and count(db, messages, messages.c.topic == "t_dlq") == 0


def test_hand_back_does_not_count_a_retry(queue, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("a"))
    [d] = sub.fetch(1)
    sub.hand_back([d])
    [again] = sub.fetch(1)
    assert (again.attempt, again.retry_count) == (2, 0)


def test_close_hands_back_unsettled_deliveries(queue, subscribe):
    first = subscribe("t")
    queue.publish("t", msg("a"))
    assert len(first.fetch(1)) == 1
    first.close()
    second = subscribe("t")
    [again] = wait_until(lambda: second.fetch(1), timeout=5)
    assert (again.message.id, again.retry_count) == ("a", 0)


def test_nothing_is_fetched_without_a_lease(queue, db, subscribe):
    sub = subscribe("t")
    queue.publish("t", Message(id="a", payload=b"", partition_key="p"))
    _steal_all_leases(db)
    sub.membership.tick(busy_slots=set())
    assert sub.membership.usable_slots() == {}
    assert sub.fetch(5) == []
