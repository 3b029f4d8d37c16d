"""The memory queue itself: the log, each group's deliveries, claims and settles, under one
lock (see the package docstring for what it keeps of the contract)."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from buildq.queue.contract import (
    Ack,
    DeadLetter,
    Defer,
    Delivery,
    DeliveryLost,
    HandBack,
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
from buildq.queue.memory.batch import (
    MemoryApply,
    MemoryCommitter,
    MemoryTransaction,
    run_effects,
    validate,
)
from buildq.queue.memory.subscription import MemoryDelivery, MemorySubscription
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


class MemoryQueue:
    """The queue contract in memory (see the module docstring)."""

    def __init__(self, *, clock: Clock = wall_clock_ms) -> None:
        self.clock = clock
        self._lock = threading.RLock()
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
        self._wake({topic})
        return results

    def _insert(
        self, topic: str, message: Message, delay_ms: int, dead: DeadLetter | None = None
    ) -> PublishResult:
        validate(topic, message)
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
