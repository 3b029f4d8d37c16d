"""The queue contract: messages, publishing, deliveries, transactions and their errors.

Nothing here knows about SQL. ``buildq.queue.sql`` implements it on MySQL/MariaDB and SQLite;
controllers and the orchestrator only ever import this module.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from buildq.queue.settings import SubscriptionSettings
from buildq.storage.errors import StorageError as StorageError  # exported: part of the contract
from buildq.storage.errors import StoreError
from buildq.storage.errors import TransientQueueError as TransientQueueError

T = TypeVar("T")

#: Suffix of a topic's dead-letter topic. Spelled here and nowhere else.
DLQ_SUFFIX = "_dlq"


def dlq_topic(topic: str) -> str:
    return topic + DLQ_SUFFIX


def is_dlq_topic(topic: str) -> bool:
    return topic.endswith(DLQ_SUFFIX)


def message_id(entity: str, cause: str, n: int | None = None) -> str:
    """The one way to build a message id: ``<entity>/<cause>[/<n>]``.

    Stable across redeliveries of the same occasion (so a replay is deduplicated) and distinct
    between occasions (so a new step is never mistaken for an old one).
    """
    return f"{entity}/{cause}" if n is None else f"{entity}/{cause}/{n}"


@dataclass(frozen=True, slots=True)
class Message:
    """A message as published. Publish is idempotent on ``(topic, partition_key, id)``."""

    id: str
    payload: bytes
    partition_key: str
    metadata: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PublishResult:
    message_id: str
    partition_key: str
    #: True when a message with this identity already existed: nothing was written.
    duplicate: bool


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The DLQ fields of a message that was moved to ``<topic>_dlq``."""

    original_topic: str
    failed_group: str
    failed_at_ms: int
    failure_count: int
    last_error: str


#: Base of every queue error: the database layer's ``StoreError`` under the contract's name, so
#: it covers ``TransientQueueError`` and ``StorageError`` (defined there, exported here) too.
QueueError = StoreError


class PublisherClosed(QueueError):
    """publish / publish_after after close()."""


class InvalidMessage(QueueError):
    """A message that cannot be stored as given (empty id, too-long key, bad metadata)."""


class PayloadTooLarge(InvalidMessage):
    """The payload exceeds the configured limit; nothing was written."""


class AlreadyAcknowledged(QueueError):
    """A second ack / nack / reject on one delivery."""


class DeliveryLost(QueueError):
    """The delivery is no longer ours: the lease on its partition moved to another subscriber,
    or its visibility timed out and it was delivered again. The write was refused; the
    current owner will process the message."""


class Delivery(Protocol):
    """One delivery of a message to one consumer group."""

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def message(self) -> Message: ...
    @property
    def offset(self) -> int: ...
    @property
    def attempt(self) -> int:
        """1 on the first delivery to this group, +1 on every redelivery."""
        ...

    @property
    def retry_count(self) -> int:
        """How many deliveries of this message to this group failed (nack or timeout)."""
        ...

    @property
    def last_error(self) -> str:
        """What the last failed delivery of this message to this group said ('' if none)."""
        ...

    @property
    def dead_letter(self) -> DeadLetter | None:
        """Set when the message is a DLQ message."""
        ...

    @property
    def due_at_ms(self) -> int:
        """When it became due (database clock, epoch ms; 0 when unknown)."""
        ...

    @property
    def delivered_at_ms(self) -> int:
        """When this member claimed it (database clock, epoch ms; 0 when unknown)."""
        ...

    @property
    def lost(self) -> bool:
        """True once this member knows the claim is gone: the delivery could not be kept
        alive (its lease moved, or it timed out and was delivered again). Writes for it will
        be refused; work not started yet should not start."""
        ...

    def ack(self) -> None: ...
    def nack(self, requeue_after_ms: int | None = None, error: str = "") -> None:
        """This delivery failed: deliver again after the delay (None: the backoff policy)."""
        ...

    def reject(self, reason: str) -> None:
        """This message can never succeed: move it to the DLQ now."""
        ...

    def extend_visibility(self, ms: int) -> None: ...


class Transaction(Protocol):
    """Writes that commit together: the atomic hand-off of "done with this, next is that"."""

    def publish(self, topic: str, message: Message) -> PublishResult: ...
    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult: ...
    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]: ...
    def ack(self, delivery: Delivery) -> None: ...
    def nack(
        self, delivery: Delivery, requeue_after_ms: int | None = None, error: str = ""
    ) -> None: ...
    def reject(self, delivery: Delivery, reason: str) -> None: ...


class Outbox(Protocol):
    """What one step of a worker publishes. The messages are written, all together, by the
    transaction that settles the step's delivery: both or neither."""

    def publish(self, topic: str, message: Message) -> None: ...
    def publish_after(self, topic: str, message: Message, delay_ms: int) -> None: ...


class BufferedOutbox:
    """An ``Outbox`` that keeps what was published, for the committer to write in its batch's
    transaction: (topic, message, delay in ms), in publish order."""

    __slots__ = ("messages",)

    def __init__(self) -> None:
        self.messages: list[tuple[str, Message, int]] = []

    def publish(self, topic: str, message: Message) -> None:
        self.messages.append((topic, message, 0))

    def publish_after(self, topic: str, message: Message, delay_ms: int) -> None:
        self.messages.append((topic, message, delay_ms))


#: What an ack writes besides itself. The committer calls it inside the batch transaction with
#: its step transaction: an ``Outbox`` for the queue's own committer, or whatever a committer
#: built with an ``apply`` hook passes (the orchestrator's carries the build store as well).
Effect = Callable[[Any], None]


@dataclass(frozen=True, slots=True)
class Ack:
    """Done: remove the delivery, and commit ``effect``'s writes with it."""

    effect: Effect | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    """Failed: deliver again after ``delay_ms`` (None: the backoff policy), one retry more."""

    delay_ms: int | None
    error: str


@dataclass(frozen=True, slots=True)
class Reject:
    """Can never succeed: move it to the dead-letter topic now."""

    reason: str


@dataclass(frozen=True, slots=True)
class Defer:
    """Not now, and not a failure (a rate limit, a full runner lane): deliver again after
    ``delay_ms`` without counting a retry."""

    delay_ms: int


@dataclass(frozen=True, slots=True)
class HandBack:
    """Never started: return it to its place in the fetch order without counting a retry."""


Action = Ack | Nack | Reject | Defer | HandBack


@dataclass(frozen=True, slots=True)
class Step:
    """A delivery and what to do with it."""

    delivery: Delivery
    action: Action


class Settled(enum.Enum):
    DONE = "done"
    #: The claim was no longer this member's (fenced out): nothing was written for the step.
    LOST = "lost"


class Committer(Protocol):
    """Settles the steps of many deliveries in one transaction, each all-or-nothing."""

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        """Write every step, or none: one result per step, in order. A fenced-out delivery is
        ``LOST`` and does not stop the others. Raises ``TransientQueueError`` when the database
        could not do it now, and any other error when a step could not be written; nothing
        is written then, and the caller may try again, or split the batch."""
        ...


class Publisher(Protocol):
    def publish(self, topic: str, message: Message) -> PublishResult: ...
    def publish_after(self, topic: str, message: Message, delay_ms: int) -> PublishResult:
        """Insert a fresh message no subscriber sees before the database's now + delay_ms."""
        ...

    def publish_many(
        self, topic: str, messages: Sequence[Message], delay_ms: int = 0
    ) -> list[PublishResult]:
        """Publish a batch in one transaction."""
        ...

    def transaction(self) -> AbstractContextManager[Transaction]: ...
    def close(self) -> None: ...


class Subscription(Protocol):
    """A consumer group's membership on one topic: leases, heartbeats, fetching, and keeping
    the claims of fetched deliveries alive until they are settled."""

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...
    @property
    def settings(self) -> SubscriptionSettings: ...

    def fetch(self, limit: int) -> Sequence[Delivery]:
        """Claim up to ``limit`` visible deliveries from the partitions this member leases."""
        ...

    def next_due_ms(self) -> int | None:
        """Milliseconds until the next delivery of this member's partitions is due, or None."""
        ...

    def wait(self, timeout_s: float) -> bool:
        """Sleep until a local publish to the topic (or ``wake``) or ``timeout_s``; True if
        woken."""
        ...

    def wake(self) -> None: ...

    def wait_for_leases(self, timeout_s: float) -> bool:
        """Wait until this member holds its share of the topic's leases (it can fetch)."""
        ...

    def problem(self) -> str | None:
        """Why this member cannot do its work now (its leases cannot be renewed: the database
        refuses writes), or None."""
        ...

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Return unprocessed deliveries without counting a retry (shutdown, rebalance)."""
        ...

    def abandon(self, deliveries: Sequence[Delivery]) -> None:
        """Stop keeping these claims alive, writing nothing: the visibility timeout brings the
        messages back (counting a retry). For deliveries that could not be settled."""
        ...

    def close(self) -> None:
        """Release leases and deregister; the other members take over at once."""
        ...


class Queue(Publisher, Protocol):
    """A queue: publishing, subscribing, and settling deliveries in batches."""

    def subscribe(
        self, topic: str, group: str, settings: SubscriptionSettings | None = None
    ) -> Subscription:
        """Join ``group`` on ``topic`` (creating the group if new) and start renewing leases."""
        ...

    def unsubscribe(self, subscription: Subscription) -> None: ...

    def expedite(self, topic: str, partition_key: str) -> int:
        """Make the partition's waiting deliveries due now; how many there were."""
        ...

    def run_in_transaction(self, step: Callable[[Transaction], T]) -> T:
        """Run ``step`` in a transaction, running it again on transient errors."""
        ...

    def committer(self) -> Committer:
        """A committer whose ack effects are called with an ``Outbox``."""
        ...
