"""The queue's tables. Alembic migrations own the live schema; this is the model they must equal.

- ``queue_messages``: the shared log, one row per message per topic (DLQ messages included).
- ``queue_groups``: consumer groups per topic, with the slot count their leases divide.
- ``queue_deliveries``: one row per (message, group) not yet done. Acked rows are deleted, so
  the fetch index only ever holds live work and an idle fetch is one short range probe.
- ``queue_leases``: ``slots`` rows per (group, topic): who may fetch which slot, and its epoch.
- ``queue_subscribers``: one row per live member (daemon × subscription), with its heartbeat.

All times are epoch milliseconds from the database server's clock.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from buildq.storage.columns import MYSQL_TABLE_ARGS, LongText, PayloadType, SeqType

metadata = MetaData()

TOPIC_MAX = 100
PARTITION_KEY_MAX = 191
MESSAGE_ID_MAX = 255
GROUP_MAX = 64
SUBSCRIBER_MAX = 128

messages = Table(
    "queue_messages",
    metadata,
    Column("seq", SeqType, primary_key=True, autoincrement=True),
    Column("topic", String(TOPIC_MAX), nullable=False),
    Column("partition_key", String(PARTITION_KEY_MAX), nullable=False),
    Column("message_id", String(MESSAGE_ID_MAX), nullable=False),
    # '' for ordinary messages; for a DLQ message, the group that failed it, so two groups
    # failing one message leave two dead letters and a requeue goes back to the right one.
    Column("dlq_group", String(GROUP_MAX), nullable=False, server_default=""),
    # crc32 of the partition key: a group's slot is partition_hash % slots.
    Column("partition_hash", BigInteger, nullable=False, server_default="0"),
    Column("payload", PayloadType, nullable=False),
    Column("metadata", LongText, nullable=False),
    Column("visible_after", BigInteger, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
    # Random per publish call: tells the rows this call inserted from pre-existing duplicates
    # without relying on AUTO_INCREMENT being consecutive.
    Column("publish_token", BigInteger, nullable=False, server_default="0"),
    Column("original_topic", String(TOPIC_MAX), nullable=True),
    Column("failed_at", BigInteger, nullable=True),
    Column("failure_count", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    UniqueConstraint(
        "topic", "partition_key", "message_id", "dlq_group", name="uq_messages_identity"
    ),
    **MYSQL_TABLE_ARGS,
)

groups = Table(
    "queue_groups",
    metadata,
    Column("topic", String(TOPIC_MAX), nullable=False),
    Column("grp", String(GROUP_MAX), nullable=False),
    Column("slots", Integer, nullable=False),
    # 0 while the registering member copies the retained log into the group's deliveries.
    Column("ready", SmallInteger, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
    PrimaryKeyConstraint("topic", "grp"),
    **MYSQL_TABLE_ARGS,
)

deliveries = Table(
    "queue_deliveries",
    metadata,
    Column("seq", SeqType, nullable=False),
    Column("grp", String(GROUP_MAX), nullable=False),
    Column("topic", String(TOPIC_MAX), nullable=False),
    Column("slot", Integer, nullable=False),
    # When it may be (re)delivered: the message's visible_after, then claim time + visibility
    # timeout while in flight, then nack time + backoff.
    Column("visible_at", BigInteger, nullable=False),
    Column("inflight", SmallInteger, nullable=False, server_default="0"),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("retry_count", Integer, nullable=False, server_default="0"),
    Column("owner", String(SUBSCRIBER_MAX), nullable=False, server_default=""),
    Column("delivered_at", BigInteger, nullable=False, server_default="0"),
    Column("last_error", Text, nullable=True),
    PrimaryKeyConstraint("seq", "grp"),
    # The fetch: equality on (grp, topic), range on visible_at, ORDER BY (visible_at, seq);
    # slot rides along so the slot filter is evaluated on index entries.
    Index("ix_deliveries_fetch", "grp", "topic", "visible_at", "seq", "slot"),
    **MYSQL_TABLE_ARGS,
)

leases = Table(
    "queue_leases",
    metadata,
    Column("grp", String(GROUP_MAX), nullable=False),
    Column("topic", String(TOPIC_MAX), nullable=False),
    Column("slot", Integer, nullable=False),
    Column("owner", String(SUBSCRIBER_MAX), nullable=False, server_default=""),
    # Bumped on every change of owner: the fencing token a delivery's writes are checked with.
    Column("epoch", BigInteger, nullable=False, server_default="0"),
    Column("expires_at", BigInteger, nullable=False, server_default="0"),
    PrimaryKeyConstraint("grp", "topic", "slot"),
    **MYSQL_TABLE_ARGS,
)

subscribers = Table(
    "queue_subscribers",
    metadata,
    Column("id", String(SUBSCRIBER_MAX), primary_key=True),
    Column("grp", String(GROUP_MAX), nullable=False),
    Column("topic", String(TOPIC_MAX), nullable=False),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", BigInteger, nullable=False),
    Column("heartbeat_at", BigInteger, nullable=False),
    Index("ix_subscribers_group", "grp", "topic", "heartbeat_at"),
    **MYSQL_TABLE_ARGS,
)
