"""``QueueAdmin.topic_stats`` as the metrics collector calls it: one query, no log scan."""

from __future__ import annotations

from dataclasses import replace

from sqlalchemy import event

from buildq.queue.sql import MessageStore
from buildq.queue.sql.admin import QueueAdmin
from tests.support.tables import msg
from tests.support.waiting import wait_until


def test_the_cheap_refresh_is_one_statement_with_the_same_group_counts(db, queue, subscribe):
    sub = subscribe("t")
    subscribe("t", group="h")
    for n in range(4):
        queue.publish("t", msg(f"m{n}"))
    queue.publish_after("t", msg("later"), 600_000)
    [d] = wait_until(lambda: sub.fetch(1))
    d.reject("no")
    admin = QueueAdmin(db, MessageStore(db))
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    full = admin.topic_stats()
    # Reads may go through a separate (autocommit) engine on MySQL.
    engines = {db.engine, getattr(db, "read_engine", db.engine)}
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    try:
        cheap = admin.topic_stats(count_messages=False)
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)

    assert len([s for s in statements if "queue_" in s]) == 1, statements
    by_topic = {s.topic: s for s in cheap}
    assert by_topic["t"].messages is None and by_topic["t_dlq"].messages == 1
    ageless = [replace(g, oldest_ready_age_ms=None) for g in by_topic["t"].groups]
    assert ageless == [replace(g, oldest_ready_age_ms=None) for g in full[0].groups]
    g, h = by_topic["t"].groups
    assert (g.group, g.pending, g.ready, g.delayed, g.dead_letters) == ("g", 4, 3, 1, 1)
    assert (h.group, h.pending, h.ready, h.delayed, h.dead_letters) == ("h", 5, 4, 1, 0)
