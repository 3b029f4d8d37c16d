"""Delayed messages: queue_messages.visible_after (epoch ms, 0 = visible now).

The default 0 keeps every row written before this revision visible, as it was.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("queue_messages") as batch:
        batch.add_column(
            sa.Column("visible_after", sa.BigInteger, nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("queue_messages") as batch:
        batch.drop_column("visible_after")
