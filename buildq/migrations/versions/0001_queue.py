"""The queue: messages, groups, deliveries, leases, subscribers.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")
PAYLOAD = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "queue_messages",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=True),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("partition_key", sa.String(191), nullable=False),
        sa.Column("message_id", sa.String(255), nullable=False),
        sa.Column("dlq_group", sa.String(64), nullable=False, server_default=""),
        sa.Column("partition_hash", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("payload", PAYLOAD, nullable=False),
        sa.Column("metadata", LONG_TEXT, nullable=False),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("publish_token", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("original_topic", sa.String(100), nullable=True),
        sa.Column("failed_at", sa.BigInteger, nullable=True),
        sa.Column("failure_count", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.UniqueConstraint(
            "topic", "partition_key", "message_id", "dlq_group", name="uq_messages_identity"
        ),
        **MYSQL,
    )
    op.create_table(
        "queue_groups",
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("grp", sa.String(64), nullable=False),
        sa.Column("slots", sa.Integer, nullable=False),
        sa.Column("ready", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint("topic", "grp"),
        **MYSQL,
    )
    op.create_table(
        "queue_deliveries",
        sa.Column("seq", SEQ, nullable=False),
        sa.Column("grp", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("visible_at", sa.BigInteger, nullable=False),
        sa.Column("inflight", sa.SmallInteger, nullable=False, server_default="0"),
        sa.Column("attempt", sa.Integer, nullable=False, server_default="0"),
        sa.Column("retry_count", sa.Integer, nullable=False, server_default="0"),
        sa.Column("owner", sa.String(128), nullable=False, server_default=""),
        sa.Column("delivered_at", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("seq", "grp"),
        **MYSQL,
    )
    op.create_index(
        "ix_deliveries_fetch", "queue_deliveries", ["grp", "topic", "visible_at", "seq", "slot"]
    )
    op.create_table(
        "queue_leases",
        sa.Column("grp", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("slot", sa.Integer, nullable=False),
        sa.Column("owner", sa.String(128), nullable=False, server_default=""),
        sa.Column("epoch", sa.BigInteger, nullable=False, server_default="0"),
        sa.Column("expires_at", sa.BigInteger, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("grp", "topic", "slot"),
        **MYSQL,
    )
    op.create_table(
        "queue_subscribers",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("grp", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(100), nullable=False),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.BigInteger, nullable=False),
        sa.Column("heartbeat_at", sa.BigInteger, nullable=False),
        **MYSQL,
    )
    op.create_index("ix_subscribers_group", "queue_subscribers", ["grp", "topic", "heartbeat_at"])


def downgrade() -> None:
    for table in (
        "queue_subscribers",
        "queue_leases",
        "queue_deliveries",
        "queue_groups",
        "queue_messages",
    ):
        op.drop_table(table)
