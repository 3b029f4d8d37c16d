"""The build store: one row per build request.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MYSQL: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}
LONG_TEXT = sa.Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "builds",
        sa.Column("request_id", sa.String(191), primary_key=True),
        sa.Column("build_id", sa.String(191), nullable=True, unique=True),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("runner", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("metadata", LONG_TEXT, nullable=False),
        sa.Column("request_metadata", LONG_TEXT, nullable=False),
        sa.Column("changes", LONG_TEXT, nullable=False),
        sa.Column("failure_reason", sa.String(16), nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("polls", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.BigInteger, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
        sa.Column("finished_at", sa.BigInteger, nullable=True),
        sa.Column("next_poll_at", sa.BigInteger, nullable=True),
        sa.Column("cancel_requested_at", sa.BigInteger, nullable=True),
        sa.Column("cancel_sent_at", sa.BigInteger, nullable=True),
        **MYSQL,
    )
    op.create_index("ix_builds_status", "builds", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_table("builds")
