"""A member of a group on the memory queue, and the deliveries it fetches: each settles through
the queue (one step in its own batch)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from buildq.queue.contract import (
    Ack,
    DeadLetter,
    Delivery,
    HandBack,
    Message,
    Nack,
    Reject,
    Step,
)
from buildq.queue.settings import SubscriptionSettings

if TYPE_CHECKING:
    from buildq.queue.memory.queue import MemoryQueue


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
