"""The cost of an idle member does not grow with the number of partition keys."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import event

from buildq.queue import Message
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database


@contextmanager
def counted_statements(db: Database) -> Iterator[list[str]]:
    """Statements this thread sends (the lease renewer runs beside it and is measured apart)."""
    statements: list[str] = []
    me = threading.get_ident()

    def _count(conn, cursor, statement, parameters, context, executemany):
        if threading.get_ident() == me:
            statements.append(statement.split(None, 1)[0].upper())

    engines = {db.engine, db.read_engine}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", _count)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", _count)


def _idle_tick(sub) -> None:
    """What the consumer loop does when nothing is due: ask when, fetch nothing."""
    assert sub.next_due_ms() > 0
    assert sub.fetch(64) == []


def test_idle_tick_costs_the_same_with_1_and_10000_partitions(queue: SqlQueue, db, subscribe):
    sub = subscribe("t")
    queue.publish_after("t", Message(id="only", payload=b"", partition_key="build-0"), 600_000)
    with counted_statements(db) as few:
        _idle_tick(sub)
    queue.publish_many(
        "t",
        [Message(id="poll", payload=b"", partition_key=f"build-{i}") for i in range(1, 10_000)],
        delay_ms=600_000,
    )
    with counted_statements(db) as many:
        _idle_tick(sub)
    with counted_statements(db) as renewal:
        sub.membership.tick(busy_slots=set())
    assert few == many
    assert [s for s in few if s != "BEGIN"] == ["SELECT", "SELECT"]  # BEGIN is SQLite's
    assert len(renewal) <= 8
