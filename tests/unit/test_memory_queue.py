"""The in-memory queue keeps the queue contract that the worker and handler tests rely on."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from buildq.queue.contract import (
    Ack,
    AlreadyAcknowledged,
    BufferedOutbox,
    DeadLetter,
    DeliveryLost,
    HandBack,
    Message,
    Nack,
    PublisherClosed,
    Settled,
    Step,
    dlq_topic,
)
from buildq.queue.memory import MemoryDelivery, MemoryQueue
from tests.unit.doubles import FAST, ManualClock, published

TOPIC = "t"


def ids(deliveries: list[MemoryDelivery]) -> list[str]:
    return [d.message.id for d in deliveries]


def test_publish_is_idempotent_on_topic_key_and_id(queue: MemoryQueue) -> None:
    first = queue.publish(TOPIC, Message("a", b"first", "k"))
    again = queue.publish(TOPIC, Message("a", b"second", "k"))
    other_key = queue.publish(TOPIC, Message("a", b"other key", "k2"))
    other_topic = queue.publish("u", Message("a", b"other topic", "k"))
    in_one_batch = queue.publish_many(TOPIC, [Message("b", b"1", "k"), Message("b", b"2", "k")])

    assert [first.duplicate, again.duplicate, other_key.duplicate, other_topic.duplicate] == [
        False,
        True,
        False,
        False,
    ]
    assert [r.duplicate for r in in_one_batch] == [False, True]
    stored = {
        (d.message.partition_key, d.message.id): d.message.payload for d in published(queue, TOPIC)
    }
    assert stored == {("k", "a"): b"first", ("k2", "a"): b"other key", ("k", "b"): b"1"}


def test_publish_after_is_invisible_until_the_clock_passes(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    published_at = clock()
    queue.publish_after(TOPIC, Message("late", b"", "k"), 5_000)
    queue.publish_after(TOPIC, Message("later in k", b"", "k"), 0)  # <= 0: like publish

    # A delayed message does not hold up its partition's later ones.
    now = subscription.fetch(10)
    assert ids(now) == ["later in k"]
    now[0].ack()
    assert subscription.next_due_ms() == 5_000
    clock.advance(4_999)
    assert subscription.fetch(10) == []
    clock.advance(1)
    [late] = subscription.fetch(10)
    assert (late.message.id, late.retry_count, late.attempt) == ("late", 0, 1)
    assert late.due_at_ms == published_at + 5_000


def test_nack_backs_off_and_dead_letters_at_max_attempts(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    settings = dataclasses.replace(FAST, max_attempts=3)  # backoff 1 s, 2 s, … no jitter
    subscription = queue.subscribe(TOPIC, "g", settings)
    other_group = queue.subscribe(TOPIC, "other", settings)
    original = Message("m", b"body", "k", {"trace": "t-1"})
    queue.publish(TOPIC, original)

    [delivery] = subscription.fetch(1)
    delivery.nack(error="boom 1")
    assert subscription.next_due_ms() == 1_000
    clock.advance(999)
    assert subscription.fetch(1) == []
    clock.advance(1)
    [delivery] = subscription.fetch(1)
    assert (delivery.retry_count, delivery.attempt, delivery.last_error) == (1, 2, "boom 1")

    delivery.nack(error="boom 2")
    clock.advance(1_999)
    assert subscription.fetch(1) == []
    clock.advance(1)
    [delivery] = subscription.fetch(1)
    assert (delivery.retry_count, delivery.attempt) == (2, 3)

    failed_at = clock()
    delivery.nack(error="boom 3")
    clock.advance(10**6)
    assert subscription.fetch(1) == []
    [letter] = published(queue, dlq_topic(TOPIC))
    assert letter.message == original
    assert letter.dead_letter == DeadLetter(TOPIC, "g", failed_at, 3, "boom 3")
    # The move is the failing group's: another group still has the message.
    assert ids(other_group.fetch(1)) == ["m"]


def test_nack_with_an_explicit_delay_uses_it(queue: MemoryQueue, clock: ManualClock) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    subscription.fetch(1)[0].nack(250, "try later")
    assert subscription.next_due_ms() == 250
    clock.advance(250)
    assert [d.retry_count for d in subscription.fetch(1)] == [1]


def test_reject_moves_to_the_dlq_at_once(queue: MemoryQueue, clock: ManualClock) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"body", "k"))
    subscription.fetch(1)[0].reject("can never work")

    clock.advance(10**6)
    assert subscription.fetch(1) == []
    [letter] = published(queue, dlq_topic(TOPIC))
    assert letter.dead_letter == DeadLetter(TOPIC, "g", clock() - 10**6, 1, "can never work")


def test_hand_back_returns_the_delivery_to_its_place_without_a_retry(
    queue: MemoryQueue,
) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("first", b"", "k"))
    queue.publish(TOPIC, Message("second", b"", "k"))
    [first] = subscription.fetch(10)  # one partition: one in flight at a time
    assert first.message.id == "first"

    subscription.hand_back([first])

    [again] = subscription.fetch(10)
    assert (again.message.id, again.retry_count, again.attempt) == ("first", 0, 2)


def test_an_abandoned_claim_comes_back_after_the_visibility_timeout(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    settings = dataclasses.replace(FAST, visibility_timeout_ms=10_000)
    subscription = queue.subscribe(TOPIC, "g", settings)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [old] = subscription.fetch(1)

    subscription.abandon([old])
    assert old.lost
    clock.advance(9_999)
    assert subscription.fetch(1) == []
    clock.advance(1)
    [new] = subscription.fetch(1)

    assert (new.retry_count, new.attempt) == (1, 2)
    with pytest.raises(DeliveryLost):
        old.ack()
    new.ack()
    clock.advance(10**6)
    assert subscription.fetch(1) == []


def test_a_claim_kept_alive_does_not_time_out(queue: MemoryQueue, clock: ManualClock) -> None:
    subscription = queue.subscribe(TOPIC, "g", dataclasses.replace(FAST, visibility_timeout_ms=1))
    queue.publish(TOPIC, Message("m", b"", "k"))
    [delivery] = subscription.fetch(1)
    clock.advance(10**6)
    assert subscription.fetch(1) == []
    delivery.ack()


def test_an_abandoned_claim_at_max_attempts_is_dead_lettered(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    settings = dataclasses.replace(FAST, visibility_timeout_ms=1_000, max_attempts=1)
    subscription = queue.subscribe(TOPIC, "g", settings)
    queue.publish(TOPIC, Message("m", b"", "k"))
    subscription.abandon(subscription.fetch(1))
    clock.advance(1_000)

    assert subscription.fetch(1) == []
    [letter] = published(queue, dlq_topic(TOPIC))
    assert letter.dead_letter is not None
    assert (letter.dead_letter.failure_count, letter.dead_letter.last_error) == (
        1,
        "visibility timeout expired",
    )


def test_a_transaction_acks_and_publishes_together(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [delivery] = subscription.fetch(1)

    with queue.transaction() as tx:
        tx.ack(delivery)
        tx.publish_after("out", Message("next", b"", "k"), 0)

    assert ids(published(queue, "out")) == ["next"]
    assert subscription.fetch(1) == []
    with pytest.raises(AlreadyAcknowledged):
        delivery.ack()


def test_a_transaction_that_raises_writes_nothing(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [delivery] = subscription.fetch(1)

    with pytest.raises(RuntimeError), queue.transaction() as tx:
        tx.ack(delivery)
        tx.publish("out", Message("next", b"", "k"))
        raise RuntimeError("the handler failed half-way")

    assert published(queue, "out") == []
    delivery.ack()  # still in flight, still ours


def test_a_transaction_with_a_lost_claim_writes_nothing(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("lost", b"", "k1"))
    queue.publish(TOPIC, Message("live", b"", "k2"))
    lost, live = subscription.fetch(2)
    subscription.abandon([lost])

    with pytest.raises(DeliveryLost), queue.transaction() as tx:
        tx.ack(live)
        tx.ack(lost)
        tx.publish("out", Message("next", b"", "k"))

    assert published(queue, "out") == []
    live.ack()


SETTLE: dict[str, Callable[[MemoryDelivery], None]] = {
    "ack": lambda d: d.ack(),
    "nack": lambda d: d.nack(0, "failed"),
    "reject": lambda d: d.reject("never"),
}


@pytest.mark.parametrize("second", sorted(SETTLE))
@pytest.mark.parametrize("first", sorted(SETTLE))
def test_a_second_settle_raises_already_acknowledged(
    queue: MemoryQueue, first: str, second: str
) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [delivery] = subscription.fetch(1)
    SETTLE[first](delivery)

    with pytest.raises(AlreadyAcknowledged):
        SETTLE[second](delivery)
    with pytest.raises(AlreadyAcknowledged), queue.transaction() as tx:
        tx.ack(delivery)


def test_acting_twice_in_one_transaction_raises_already_acknowledged(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [delivery] = subscription.fetch(1)

    with pytest.raises(AlreadyAcknowledged), queue.transaction() as tx:
        tx.ack(delivery)
        tx.nack(delivery, 0, "and fail it too")

    delivery.ack()  # the transaction wrote nothing


def _publishes(topic: str, message_id: str) -> Callable[[BufferedOutbox], None]:
    def effect(outbox: BufferedOutbox) -> None:
        outbox.publish(topic, Message(message_id, b"", message_id))

    return effect


def test_the_committer_reports_a_fenced_step_lost_without_sinking_the_others(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    settings = dataclasses.replace(FAST, visibility_timeout_ms=1_000)
    subscription = queue.subscribe(TOPIC, "g", settings)
    queue.publish(TOPIC, Message("fenced", b"", "k1"))
    queue.publish(TOPIC, Message("fine", b"", "k2"))
    queue.publish(TOPIC, Message("failed", b"", "k3"))
    fenced, fine, failed = subscription.fetch(3)
    subscription.abandon([fenced])
    clock.advance(1_000)
    [redelivered] = subscription.fetch(3)  # someone else's claim now

    results = queue.committer().commit(
        [
            Step(fenced, Ack(_publishes("out", "from-fenced"))),
            Step(fine, Ack(_publishes("out", "from-fine"))),
            Step(failed, Nack(60_000, "no")),
        ]
    )

    assert results == [Settled.LOST, Settled.DONE, Settled.DONE]
    assert ids(published(queue, "out")) == ["from-fine"]
    assert fenced.lost
    redelivered.ack()  # the current claim was not touched
    clock.advance(60_000)
    assert [(d.message.id, d.retry_count) for d in subscription.fetch(3)] == [("failed", 1)]


def test_the_committer_writes_nothing_when_an_effect_raises(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("good", b"", "k1"))
    queue.publish(TOPIC, Message("bad", b"", "k2"))
    good, bad = subscription.fetch(2)

    def explode(outbox: BufferedOutbox) -> None:
        outbox.publish("out", Message("half-done", b"", "k"))
        raise RuntimeError("the effect failed")

    with pytest.raises(RuntimeError):
        queue.committer().commit(
            [Step(good, Ack(_publishes("out", "from-good"))), Step(bad, Ack(explode))]
        )

    assert published(queue, "out") == []
    assert queue.committer().commit([Step(good, Ack()), Step(bad, HandBack())]) == [
        Settled.DONE,
        Settled.DONE,
    ]


def test_every_consumer_group_sees_every_message(queue: MemoryQueue) -> None:
    one = queue.subscribe(TOPIC, "one", FAST)
    two = queue.subscribe(TOPIC, "two", FAST)
    queue.publish(TOPIC, Message("m", b"", "k"))
    [a] = one.fetch(1)
    a.ack()
    assert ids(two.fetch(1)) == ["m"]


def test_a_publish_wakes_the_members_of_its_topic_only(queue: MemoryQueue) -> None:
    member = queue.subscribe(TOPIC, "g", FAST)
    assert member.wait(0) is False
    queue.publish("elsewhere", Message("m", b"", "k"))
    assert member.wait(0) is False
    queue.publish(TOPIC, Message("m", b"", "k"))
    assert member.wait(0) is True
    with queue.transaction() as tx:
        tx.publish(TOPIC, Message("n", b"", "k"))
    assert member.wait(0) is True


def test_a_message_behind_one_in_flight_in_its_partition_is_not_due(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish(TOPIC, Message("first", b"", "k"))
    queue.publish(TOPIC, Message("second", b"", "k"))
    [first] = subscription.fetch(10)

    # Reporting "second" as due while fetch cannot hand it out made a worker's fetch loop spin.
    assert subscription.next_due_ms() is None
    first.ack()
    due = subscription.next_due_ms()
    assert due is not None and due <= 0
    assert ids(subscription.fetch(10)) == ["second"]


def test_expedite_makes_a_partitions_waiting_deliveries_due(queue: MemoryQueue) -> None:
    subscription = queue.subscribe(TOPIC, "g", FAST)
    queue.publish_after(TOPIC, Message("poll", b"", "build-1"), 60_000)
    queue.publish_after(TOPIC, Message("other", b"", "build-2"), 60_000)

    assert queue.expedite(TOPIC, "build-1") == 1
    assert ids(subscription.fetch(10)) == ["poll"]


def test_publishing_after_close_raises_publisher_closed(queue: MemoryQueue) -> None:
    queue.close()
    with pytest.raises(PublisherClosed):
        queue.publish(TOPIC, Message("m", b"", "k"))
    with pytest.raises(PublisherClosed):
        queue.publish_after(TOPIC, Message("m", b"", "k"), 10)
