"""The queue's tables read and written around the queue, as an operator's tools see them: a
message to publish, every row (to show a command changed nothing), rows matching a filter."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from buildq.queue import Message
from buildq.queue.sql.schema import metadata
from buildq.storage.database import Database

QUEUE_TABLES = ("queue_messages", "queue_groups", "queue_deliveries", "queue_leases")


def msg(mid: str, key: str = "p", payload: bytes = b'{"n": 1}', **meta: str) -> Message:
    return Message(id=mid, payload=payload, partition_key=key, metadata=meta)


def snapshot(db: Database) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the queue's tables (subscribers aside: their heartbeats tick; and lease
    expiry times, which renewal moves on every tick)."""

    def read(conn: sa.Connection) -> dict[str, list[tuple[Any, ...]]]:
        tables = {name: metadata.tables[name] for name in QUEUE_TABLES}
        out = {}
        for name, table in tables.items():
            columns = [
                c for c in table.c if not (name == "queue_leases" and c.name == "expires_at")
            ]
            out[name] = sorted(tuple(row) for row in conn.execute(sa.select(*columns)))
        return out

    return db.read(read)


def rows(db: Database, table: str, **where: Any) -> list[Any]:
    t = metadata.tables[table]
    stmt = sa.select(t).where(*(t.c[k] == v for k, v in where.items()))
    return db.read(lambda conn: list(conn.execute(stmt).mappings()))


def execute(db: Database, stmt: Any) -> None:
    db.write(lambda conn: conn.execute(stmt))
