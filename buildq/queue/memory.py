"""An in-memory queue for tests: the whole contract, in one process, nothing on disk.

It keeps the semantics unit tests of handlers and of the worker rely on: idempotent publish by
``(topic, partition key, id)``, delays, consumer groups each with their own deliveries,
partition order for first deliveries, nack with backoff and a DLQ after ``max_attempts``,
reject, hand-back without a retry, fenced settles (``DeliveryLost`` for a claim that was
given up and delivered again), and batched settling through ``committer()``. It has one
member per group (no leases to share) and its clock is injectable.

Not for production: nothing survives the process. Tests of the SQL queue run on SQLite and
MariaDB; this is for fast tests of decisions, beside those.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from buildq.queue.contract import (
    Ack,
    AlreadyAcknowledged,
    BufferedOutbox,
    DeadLetter,
    Defer,
    Delivery,
    DeliveryLost,
    Effect,
    HandBack,
    InvalidMessage,
    Message,
    Nack,
    PublisherClosed,
    PublishResult,
    QueueError,
    Reject,
    Settled,
    Step,
    dlq_topic,
)
from buildq.queue.settings import SubscriptionSettings

T = TypeVar("T")
Clock = Callable[[], int]


def wall_clock_ms() -> int:
    return int(time.time() * 1000)


@dataclass(slots=True)
class _Stored:
    seq: int
    topic: str
    message: Message
    visible_after: int
    created_at: int
    dead_letter: DeadLetter | None = None


@dataclass(slots=True)
class _State:
    visible_at: int
    attempt: int = 0
    retry_count: int = 0
    inflight: bool = False
    #: In flight and kept alive by its member (as the SQL queue's lease thread does): it
    #: times out only once given up (``abandon``).
    kept: bool = False
    owner: str = ""
    last_error: str = ""


@dataclass(eq=False)
class MemoryDelivery:
    topic: str
    group: str
    message: Message
    offset: int
    attempt: int
    retry_count: int
    last_error: str
    dead_letter: DeadLetter | None
    due_at_ms: int
    delivered_at_ms: int
    _subscription: MemorySubscription = field(repr=False)
    _settled: bool = field(default=False, repr=False)
    _lost: bool = field(default=False, repr=False)

    @property
    def lost(self) -> bool:
        return self._lost

    def ack(self) -> None:
        self._subscription.queue.settle(Step(self, Ack()))

    def nack(self, requeue_after_ms: int | None = None, error: str = "") -> None:
        self._subscription.queue.settle(Step(self, Nack(requeue_after_ms, error)))

    def reject(self, reason: str) -> None:
        self._subscription.queue.settle(Step(self, Reject(reason)))

    def extend_visibility(self, ms: int) -> None:
        self._subscription.queue.extend(self, ms)


@dataclass(slots=True)
class MemorySession:
    """A batch being committed: stores register what to write if it commits."""

    now_ms: int
    on_commit: list[Callable[[], None]] = field(default_factory=list)


@dataclass(slots=True)
class MemoryAckedStep:
    delivery: MemoryDelivery
    effect: Effect | None
    outbox: BufferedOutbox = field(default_factory=BufferedOutbox)


MemoryApply = Callable[[MemorySession, Sequence[MemoryAckedStep]], None]


def run_effects(session: MemorySession, steps: Sequence[MemoryAckedStep]) -> None:
    for step in steps:
        if step.effect is not None:
            step.effect(step.outbox)


class MemoryQueue:
    """The queue contract in memory (see the module docstring)."""

    def __init__(self, *, clock: Clock = wall_clock_ms) -> None:
        self.clock = clock
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._seq = itertools.count(1)
        self._log: dict[int, _Stored] = {}
        self._ids: dict[tuple[str, str, str, str], int] = {}
        self._groups: dict[str, dict[str, dict[int, _State]]] = {}  # topic -> group -> seq
        self._members: dict[tuple[str, str], MemorySubscription] = {}
        self._closed = False

    # --- publishing -----------------------------------------------------------------------

    def publish(self, topic: str, message: Message) -> PublishResult:
        return self.publish_many(topic, [message])[0]

    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult:
        return self.publish_many(topic, [message], delay_ms)[0]

    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]:
        with self._lock:
            self._check_open()
            results = [self._insert(topic, m, delay_ms) for m in messages]
            self._changed.notify_all()
        self._wake({topic})
        return results

    def _insert(
        self, topic: str, message: Message, delay_ms: int, dead: DeadLetter | None = None
    ) -> PublishResult:
        _validate(topic, message)
        identity = (topic, message.partition_key, message.id, dead.failed_group if dead else "")
        if identity in self._ids:
            return PublishResult(message.id, message.partition_key, duplicate=True)
        now = self.clock()
        stored = _Stored(
            next(self._seq), topic, message, now + delay_ms if delay_ms > 0 else 0, now, dead
        )
        self._log[stored.seq] = stored
        self._ids[identity] = stored.seq
        for states in self._groups.get(topic, {}).values():
            states[stored.seq] = _State(visible_at=stored.visible_after)
        return PublishResult(message.id, message.partition_key, duplicate=False)

    def _check_open(self) -> None:
        if self._closed:
            raise PublisherClosed("the publisher is closed")

    def _wake(self, topics: set[str]) -> None:
        """Wake the members of ``topics`` (a local publish ends their ``wait``)."""
        with self._lock:
            members = [m for (topic, _), m in self._members.items() if topic in topics]
        for member in members:
            member.wake()

    @contextmanager
    def transaction(self) -> Iterator[MemoryTransaction]:
        tx = MemoryTransaction(self)
        yield tx
        tx.commit()

    def run_in_transaction(self, step: Callable[[MemoryTransaction], T]) -> T:
        with self.transaction() as tx:
            return step(tx)

    def close(self) -> None:
        self._closed = True

    # --- subscribing ------------------------------------------------------------------------

    def subscribe(
        self, topic: str, group: str, settings: SubscriptionSettings | None = None
    ) -> MemorySubscription:
        with self._lock:
            self._check_open()
            if (topic, group) in self._members:
                raise QueueError(
                    f"the memory queue has one member per group: {group!r} on {topic!r}"
                )
            states = self._groups.setdefault(topic, {})
            if group not in states:  # a new group starts from the retained log
                states[group] = {
                    s.seq: _State(visible_at=s.visible_after)
                    for s in self._log.values()
                    if s.topic == topic
                }
            member = MemorySubscription(self, topic, group, settings or SubscriptionSettings())
            self._members[(topic, group)] = member
            return member

    def unsubscribe(self, subscription: MemorySubscription) -> None:
        subscription.close()

    def expedite(self, topic: str, partition_key: str) -> int:
        with self._lock:
            now = self.clock()
            woken = 0
            for states in self._groups.get(topic, {}).values():
                for seq, state in states.items():
                    stored = self._log[seq]
                    if (
                        stored.message.partition_key == partition_key
                        and not state.inflight
                        and state.visible_at > now
                    ):
                        state.visible_at = now
                        woken += 1
            if woken:
                self._changed.notify_all()
            return woken

    def committer(self, apply: MemoryApply = run_effects) -> MemoryCommitter:
        return MemoryCommitter(self, apply)

    # --- claims -------------------------------------------------------------------------------

    def fetch(self, member: MemorySubscription, limit: int) -> list[MemoryDelivery]:
        with self._lock:
            now = self.clock()
            states = self._groups[member.topic][member.group]
            due = sorted(
                (state.visible_at, seq)
                for seq, state in states.items()
                if state.visible_at <= now and not state.kept
            )
            busy = {self._log[s].message.partition_key for s, st in states.items() if st.inflight}
            out: list[MemoryDelivery] = []
            for _due, seq in due:
                if len(out) >= limit:
                    break
                state, stored = states[seq], self._log[seq]
                key = stored.message.partition_key
                if key in busy and not state.inflight:
                    continue  # partition order: an earlier message of it is in flight
                if state.inflight:
                    state.retry_count += 1  # its claim timed out: a failed delivery
                if state.retry_count >= member.settings.max_attempts:
                    self._dead_letter(
                        member, seq, state, state.last_error or "visibility timeout expired"
                    )
                    continue
                state.inflight, state.kept, state.owner = True, True, member.member_id
                state.attempt += 1
                due_at = state.visible_at or stored.created_at
                state.visible_at = now + member.settings.visibility_timeout_ms
                busy.add(key)
                out.append(
                    MemoryDelivery(
                        member.topic,
                        member.group,
                        stored.message,
                        seq,
                        state.attempt,
                        state.retry_count,
                        state.last_error,
                        stored.dead_letter,
                        due_at,
                        now,
                        member,
                    )
                )
            return out

    def next_due_ms(self, member: MemorySubscription) -> int | None:
        with self._lock:
            states = self._groups[member.topic][member.group]
            busy = {self._log[s].message.partition_key for s, st in states.items() if st.inflight}
            # What fetch could hand out: a message behind an earlier one of its partition that
            # is in flight is not due (counting it made a worker's fetch loop spin).
            waiting = [
                state.visible_at
                for seq, state in states.items()
                if not state.kept
                and (state.inflight or self._log[seq].message.partition_key not in busy)
            ]
            return min(waiting) - self.clock() if waiting else None

    def _claim(self, delivery: Delivery) -> tuple[_State | None, MemoryDelivery]:
        if not isinstance(delivery, MemoryDelivery):
            raise QueueError(f"not a delivery of this queue: {type(delivery).__name__}")
        states = self._groups.get(delivery.topic, {}).get(delivery.group, {})
        state = states.get(delivery.offset)
        current = (
            state is not None
            and state.inflight
            and state.attempt == delivery.attempt
            and not delivery.lost
        )
        return (state if current else None), delivery

    def extend(self, delivery: MemoryDelivery, ms: int) -> None:
        with self._lock:
            state, claim = self._claim(delivery)
            if state is None:
                claim._lost = True
                raise DeliveryLost(f"the claim of {claim.message.id!r} is no longer ours")
            state.visible_at = self.clock() + max(0, ms)

    def abandon(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for delivery in deliveries:
                state, claim = self._claim(delivery)
                claim._lost = True
                if state is not None:
                    state.kept = False

    def settle(self, step: Step) -> None:
        """One step in its own transaction; DeliveryLost if the claim is gone."""
        if self.committer().commit([step]) == [Settled.LOST]:
            raise DeliveryLost(f"the claim of {step.delivery.message.id!r} is no longer ours")

    def apply_settle(self, claim: MemoryDelivery, state: _State, step: Step) -> None:
        member = claim._subscription
        action = step.action
        states = self._groups[claim.topic][claim.group]
        if isinstance(action, Ack):
            del states[claim.offset]
        elif isinstance(action, Nack):
            delay = action.delay_ms
            if delay is None:
                delay = member.settings.backoff.delay_ms(state.retry_count)
            state.inflight, state.kept, state.owner = False, False, ""
            state.last_error = action.error
            state.retry_count += 1
            state.visible_at = self.clock() + max(0, delay)
            if state.retry_count >= member.settings.max_attempts:
                self._dead_letter(member, claim.offset, state, action.error or "failed")
        elif isinstance(action, Reject):
            state.retry_count += 1
            self._dead_letter(member, claim.offset, state, action.reason or "rejected")
        elif isinstance(action, Defer):
            state.inflight, state.kept, state.owner = False, False, ""
            state.visible_at = self.clock() + max(0, action.delay_ms)
        elif isinstance(action, HandBack):
            state.inflight, state.kept, state.owner = False, False, ""
            state.visible_at = self._log[claim.offset].visible_after
        claim._settled = True

    def _dead_letter(self, member: MemorySubscription, seq: int, state: _State, error: str) -> None:
        stored = self._log[seq]
        dead = DeadLetter(stored.topic, member.group, self.clock(), state.retry_count, error)
        self._insert(dlq_topic(stored.topic), stored.message, 0, dead)
        del self._groups[member.topic][member.group][seq]

    def close_member(self, member: MemorySubscription) -> None:
        with self._lock:
            self._members.pop((member.topic, member.group), None)


class MemorySubscription:
    def __init__(
        self, queue: MemoryQueue, topic: str, group: str, settings: SubscriptionSettings
    ) -> None:
        self.queue = queue
        self.topic = topic
        self.group = group
        self.settings = settings
        self.member_id = f"memory:{id(self):x}"
        self._woken = threading.Event()

    def fetch(self, limit: int) -> list[MemoryDelivery]:
        return self.queue.fetch(self, limit)

    def next_due_ms(self) -> int | None:
        return self.queue.next_due_ms(self)

    def wait(self, timeout_s: float) -> bool:
        woken = self._woken.wait(timeout_s)
        self._woken.clear()
        return woken

    def wake(self) -> None:
        self._woken.set()

    def wait_for_leases(self, timeout_s: float) -> bool:
        return True  # the only member holds every partition

    def problem(self) -> str | None:
        return None

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        self.queue.committer().commit([Step(d, HandBack()) for d in deliveries])

    def abandon(self, deliveries: Sequence[Delivery]) -> None:
        self.queue.abandon(deliveries)

    def close(self) -> None:
        self.queue.close_member(self)


class MemoryCommitter:
    def __init__(self, queue: MemoryQueue, apply: MemoryApply = run_effects) -> None:
        self._queue = queue
        self._apply = apply

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        queue = self._queue
        with queue._lock:
            claims = [queue._claim(step.delivery) for step in steps]
            for _state, claim in claims:
                if claim._settled:
                    raise AlreadyAcknowledged(
                        f"delivery of {claim.message.id!r} was already settled"
                    )
            acked = [
                MemoryAckedStep(claim, step.action.effect)
                for step, (state, claim) in zip(steps, claims, strict=True)
                if state is not None and isinstance(step.action, Ack)
            ]
            session = MemorySession(queue.clock())
            self._apply(session, acked)  # raises before anything is written
            for acked_step in acked:
                for topic, message, _delay in acked_step.outbox.messages:
                    _validate(topic, message)
            results = []
            for step, (state, claim) in zip(steps, claims, strict=True):
                if state is None:
                    claim._lost = True
                    results.append(Settled.LOST)
                    continue
                queue.apply_settle(claim, state, step)
                results.append(Settled.DONE)
            for write in session.on_commit:
                write()
            for acked_step in acked:
                for topic, message, delay_ms in acked_step.outbox.messages:
                    queue._insert(topic, message, delay_ms)
            queue._changed.notify_all()
        for member in list(queue._members.values()):
            member.wake()
        return results


class MemoryTransaction:
    """Publishes and settles that apply together when the ``with`` block ends."""

    def __init__(self, queue: MemoryQueue) -> None:
        self._queue = queue
        self._outbox = BufferedOutbox()
        self._steps: list[Step] = []

    def publish(self, topic: str, message: Message) -> PublishResult:
        return self.publish_after(topic, message, 0)

    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult:
        _validate(topic, message)
        self._outbox.publish_after(topic, message, delay_ms)
        with self._queue._lock:
            duplicate = (topic, message.partition_key, message.id, "") in self._queue._ids
        return PublishResult(message.id, message.partition_key, duplicate)

    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]:
        return [self.publish_after(topic, m, delay_ms) for m in messages]

    def ack(self, delivery: Delivery) -> None:
        self._settling(Step(delivery, Ack()))

    def nack(
        self, delivery: Delivery, requeue_after_ms: int | None = None, error: str = ""
    ) -> None:
        self._settling(Step(delivery, Nack(requeue_after_ms, error)))

    def reject(self, delivery: Delivery, reason: str) -> None:
        self._settling(Step(delivery, Reject(reason)))

    def _settling(self, step: Step) -> None:
        """Acting twice on one delivery (before, or in this transaction) is refused at once,
        as the SQL transaction does."""
        delivery = step.delivery
        if getattr(delivery, "_settled", False) or any(s.delivery is delivery for s in self._steps):
            raise AlreadyAcknowledged(f"delivery of {delivery.message.id!r} was already settled")
        self._steps.append(step)

    def commit(self) -> None:
        """All or nothing: a claim that is no longer ours refuses the whole transaction."""
        queue = self._queue
        with queue._lock:
            queue._check_open()
            for step in self._steps:
                state, claim = queue._claim(step.delivery)
                if state is None:
                    claim._lost = True
                    raise DeliveryLost(f"the claim of {claim.message.id!r} is no longer ours")
            if self._steps:
                queue.committer().commit(self._steps)
            for topic, message, delay_ms in self._outbox.messages:
                queue._insert(topic, message, delay_ms)
        queue._wake({topic for topic, _, _ in self._outbox.messages})


def _validate(topic: str, message: Message) -> None:
    if not isinstance(message, Message):
        raise InvalidMessage(f"expected a Message, got {type(message).__name__}")
    if not topic or not message.id:
        raise InvalidMessage("topic and message id must not be empty")
    if not isinstance(message.payload, bytes | bytearray | memoryview):
        raise InvalidMessage("payload must be bytes")
    if not isinstance(message.metadata, Mapping):
        raise InvalidMessage("metadata must be a mapping of strings to strings")


__all__ = [
    "MemoryAckedStep",
    "MemoryCommitter",
    "MemoryDelivery",
    "MemoryQueue",
    "MemorySession",
    "MemorySubscription",
    "MemoryTransaction",
    "wall_clock_ms",
]
