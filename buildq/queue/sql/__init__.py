"""The queue on MySQL/MariaDB and SQLite (SQLAlchemy Core)."""

from buildq.queue.sql.delivery import SqlDelivery
from buildq.queue.sql.leases import GroupMismatch
from buildq.queue.sql.messages import MessageStore, StoredMessage
from buildq.queue.sql.queue import SqlQueue, SqlTransaction
from buildq.queue.sql.subscription import SqlSubscription

__all__ = [
    "GroupMismatch",
    "MessageStore",
    "SqlDelivery",
    "SqlQueue",
    "SqlSubscription",
    "SqlTransaction",
    "StoredMessage",
]
