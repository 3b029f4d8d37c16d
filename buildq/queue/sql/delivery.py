"""A delivery of the SQL queue: the message, where its claim stands, and the fence it was
fetched under (slot and epoch). It settles through the subscription that fetched it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from buildq.queue.contract import DeadLetter, Delivery, Message, QueueError

if TYPE_CHECKING:
    from buildq.queue.sql.subscription import SqlSubscription


class ClaimState(enum.Enum):
    OPEN = "open"
    PENDING = "pending"  # settled inside a transaction that has not committed yet
    SETTLED = "settled"
    LOST = "lost"  # the claim is gone: fenced out, or given up (abandon)


@dataclass(eq=False)
class SqlDelivery:
    topic: str
    group: str
    message: Message
    offset: int
    attempt: int
    retry_count: int
    dead_letter: DeadLetter | None
    slot: int
    epoch: int
    last_error: str
    _subscription: SqlSubscription = field(repr=False)
    _state: ClaimState = field(default=ClaimState.OPEN, repr=False)
    #: When this delivery became due and when it was claimed (database clock, epoch ms):
    #: the difference is its dispatch lag.
    due_at_ms: int = 0
    delivered_at_ms: int = 0
    #: When the claim runs out, as far as this process knows (time.monotonic()).
    claimed_until: float = 0.0

    @property
    def lost(self) -> bool:
        return self._state is ClaimState.LOST

    def ack(self) -> None:
        self._subscription.settle(self, lambda conn: self._subscription.ack_in(conn, self))

    def nack(self, requeue_after_ms: int | None = None, error: str = "") -> None:
        sub = self._subscription
        sub.settle(self, lambda conn: sub.nack_in(conn, self, requeue_after_ms, error))

    def reject(self, reason: str) -> None:
        sub = self._subscription
        sub.settle(self, lambda conn: sub.reject_in(conn, self, reason))

    def extend_visibility(self, ms: int) -> None:
        self._subscription.extend(self, ms)

    def mark(self, state: ClaimState) -> None:
        self._state = state


def sql_delivery(delivery: Delivery) -> SqlDelivery:
    if not isinstance(delivery, SqlDelivery):
        raise QueueError(f"not a delivery of this queue: {type(delivery).__name__}")
    return delivery
