"""Settling many deliveries at once in the memory queue: the committer (the worker's batches,
as ``buildq.queue.sql.batch`` does in SQL) and transactions (publishes and settles that
apply together, or not at all).

A batch runs the effects of its acks first (``MemoryApply``: a store registers its writes on
the session), and writes nothing if one raises; then every settle, the stores' writes and the
published messages apply under the queue's lock. A claim that is no longer current is
``LOST`` in a batch and refuses a whole transaction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from buildq.queue.contract import (
    Ack,
    AlreadyAcknowledged,
    BufferedOutbox,
    Delivery,
    DeliveryLost,
    Effect,
    InvalidMessage,
    Message,
    Nack,
    PublishResult,
    Reject,
    Settled,
    Step,
)

if TYPE_CHECKING:
    from buildq.queue.memory.queue import MemoryQueue
    from buildq.queue.memory.subscription import MemoryDelivery


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
                    validate(topic, message)
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
        validate(topic, message)
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


def validate(topic: str, message: Message) -> None:
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
    "MemoryApply",
    "MemoryCommitter",
    "MemorySession",
    "MemoryTransaction",
    "run_effects",
    "validate",
]
