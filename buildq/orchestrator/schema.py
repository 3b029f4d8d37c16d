"""The build store's table. One row per build request; ``build_id`` once the runner accepted it."""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text

from buildq.storage.columns import MYSQL_TABLE_ARGS, QUEUE_NAME_MAX, RUNNER_NAME_MAX, LongText

metadata = MetaData()

builds = Table(
    "builds",
    metadata,
    Column("request_id", String(191), primary_key=True),
    Column("build_id", String(191), nullable=True, unique=True),
    Column("queue", String(QUEUE_NAME_MAX), nullable=False),
    Column("runner", String(RUNNER_NAME_MAX), nullable=False),
    Column("status", String(16), nullable=False),
    Column("metadata", LongText, nullable=False),
    Column("request_metadata", LongText, nullable=False),
    Column("changes", LongText, nullable=False),
    Column("failure_reason", String(16), nullable=True),
    Column("error", Text, nullable=True),
    Column("polls", Integer, nullable=False, server_default="0"),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("finished_at", BigInteger, nullable=True),
    Column("next_poll_at", BigInteger, nullable=True),
    Column("cancel_requested_at", BigInteger, nullable=True),
    Column("cancel_sent_at", BigInteger, nullable=True),
    Index("ix_builds_status", "status", "updated_at"),
    **MYSQL_TABLE_ARGS,
)
