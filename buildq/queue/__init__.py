"""The durable queue: contract here, SQL implementation in ``buildq.queue.sql``, an in-memory
one for tests in ``buildq.queue.memory``, and the worker that runs self-rescheduling work on
it in ``buildq.queue.worker``.

    import buildq.queue
    queue = buildq.queue.open("sqlite:///var/buildq.db")   # or mysql+pymysql://…
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from buildq.queue.contract import (
    DLQ_SUFFIX,
    Ack,
    Action,
    AlreadyAcknowledged,
    Committer,
    DeadLetter,
    Defer,
    Delivery,
    DeliveryLost,
    HandBack,
    InvalidMessage,
    Message,
    Nack,
    Outbox,
    PayloadTooLarge,
    Publisher,
    PublisherClosed,
    PublishResult,
    Queue,
    QueueError,
    Reject,
    Settled,
    Step,
    StorageError,
    Subscription,
    Transaction,
    TransientQueueError,
    dlq_topic,
    is_dlq_topic,
    message_id,
)
from buildq.queue.settings import DEFAULT_MAX_PAYLOAD_BYTES, Backoff, SubscriptionSettings

if TYPE_CHECKING:
    from buildq.queue.sql import SqlQueue


class NotMigrated(QueueError):
    """The database has no buildq schema, or an older one: ``buildq db upgrade`` makes it."""


def open(
    url: str, *, pool_size: int = 10, max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
) -> SqlQueue:
    """The queue in the database at ``url`` (``sqlite:///PATH`` or ``mysql+pymysql://…``).

    The schema must be there already: a database that is missing or not migrated to this
    version is refused with ``NotMigrated`` saying to run ``buildq db upgrade`` (opening never
    creates a file or a table). The queue owns the engine it opened: ``close()`` releases it.
    """
    from buildq.migrations import current_revision, head_revision
    from buildq.queue.sql import SqlQueue
    from buildq.storage.database import Database, create_engine, redacted_url
    from buildq.storage.errors import DatabaseMissing

    shown = redacted_url(url)
    fix = f"run 'buildq db upgrade --url {shown}' first"
    try:
        engine = create_engine(url, pool_size=pool_size)
    except DatabaseMissing as err:
        raise NotMigrated(f"no database at {err.path}: {fix}") from None
    try:
        revision = current_revision(engine)
    except Exception:
        engine.dispose()
        raise
    if revision != head_revision():
        engine.dispose()
        found = "no buildq schema" if revision is None else f"schema revision {revision}"
        raise NotMigrated(f"database {shown} has {found}, not {head_revision()}: {fix}")
    return SqlQueue(Database(engine), max_payload_bytes=max_payload_bytes, owns_db=True)


__all__ = [
    "DLQ_SUFFIX",
    "Ack",
    "Action",
    "AlreadyAcknowledged",
    "Backoff",
    "Committer",
    "DeadLetter",
    "Defer",
    "Delivery",
    "DeliveryLost",
    "HandBack",
    "InvalidMessage",
    "Message",
    "Nack",
    "NotMigrated",
    "Outbox",
    "PayloadTooLarge",
    "PublishResult",
    "Publisher",
    "PublisherClosed",
    "Queue",
    "QueueError",
    "Reject",
    "Settled",
    "Step",
    "StorageError",
    "Subscription",
    "SubscriptionSettings",
    "Transaction",
    "TransientQueueError",
    "dlq_topic",
    "is_dlq_topic",
    "message_id",
    "open",
]
