"""The queue contract: messages, publishing, deliveries, transactions and their errors.

Nothing here knows about SQL. ``buildq.queue.sql`` implements it on MySQL/MariaDB and SQLite;
controllers and the orchestrator only ever import this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

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


class QueueError(Exception):
    """Base of every queue error."""


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


class TransientQueueError(QueueError):
    """The database could not do it now (down, deadlock, lock timeout); safe to retry."""


class StorageError(QueueError):
    """The database refused the operation for a reason retrying will not fix."""


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
    def dead_letter(self) -> DeadLetter | None:
        """Set when the message is a DLQ message."""
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
    """A consumer group's membership on one topic: leases, heartbeats, and fetching."""

    @property
    def topic(self) -> str: ...
    @property
    def group(self) -> str: ...

    def fetch(self, limit: int) -> Sequence[Delivery]:
        """Claim up to ``limit`` visible deliveries from the partitions this member leases."""
        ...

    def next_due_ms(self) -> int | None:
        """Milliseconds until the next delivery of this member's partitions is due, or None."""
        ...

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        """Return unprocessed deliveries without counting a retry (shutdown, rebalance)."""
        ...

    def close(self) -> None:
        """Release leases and deregister; the other members take over at once."""
        ...
