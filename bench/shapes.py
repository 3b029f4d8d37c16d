"""How fast a publish *could* be: its statement shapes on the raw driver, next to ceiling (a).

These split P2's gap to (a) into the part the SQL design costs and the part Python costs:

- ``statements``: today's publish on the raw driver — INSERT IGNORE the message, INSERT IGNORE
  … SELECT its delivery per consumer group, COMMIT: three round trips where (a) has one. The
  best P2 single can do without changing the SQL.
- ``trigger``: the fan-out done by an AFTER INSERT trigger, so a publish is one autocommitted
  INSERT, the shape of (a) itself. Measured on copies of the two tables (``bench_trig_*``) so
  nothing else in the database sees the trigger.
"""

from __future__ import annotations

import itertools
import random
import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from bench.databases import Backend
from bench.timing import run_threads

TOPIC = "bench_shape"
_COLUMNS = (
    "topic, partition_key, message_id, partition_hash, payload, metadata, visible_after,"
    " created_at, publish_token"
)
_MYSQL_SETUP = (
    "CREATE TABLE bench_trig_messages LIKE queue_messages",
    "CREATE TABLE bench_trig_deliveries LIKE queue_deliveries",
    "CREATE TRIGGER bench_trig_fan_out AFTER INSERT ON bench_trig_messages FOR EACH ROW"
    " INSERT IGNORE INTO bench_trig_deliveries (seq, grp, topic, slot, visible_at)"
    " SELECT NEW.seq, g.grp, NEW.topic, NEW.partition_hash % g.slots, NEW.visible_after"
    " FROM queue_groups g WHERE g.topic = NEW.topic",
)
_SQLITE_SETUP = (
    "CREATE TABLE bench_trig_messages (seq INTEGER PRIMARY KEY, topic VARCHAR(100) NOT NULL,"
    " partition_key VARCHAR(191) NOT NULL, message_id VARCHAR(255) NOT NULL,"
    " dlq_group VARCHAR(64) NOT NULL DEFAULT '', partition_hash BIGINT NOT NULL,"
    " payload BLOB NOT NULL, metadata TEXT NOT NULL, visible_after BIGINT NOT NULL,"
    " created_at BIGINT NOT NULL, publish_token BIGINT NOT NULL,"
    " UNIQUE (topic, partition_key, message_id, dlq_group))",
    "CREATE TABLE bench_trig_deliveries (seq INTEGER NOT NULL, grp VARCHAR(64) NOT NULL,"
    " topic VARCHAR(100) NOT NULL, slot INTEGER NOT NULL, visible_at BIGINT NOT NULL,"
    " inflight SMALLINT NOT NULL DEFAULT 0, PRIMARY KEY (seq, grp))",
    "CREATE INDEX bench_trig_fetch ON bench_trig_deliveries (grp, topic, visible_at, seq, slot)",
    "CREATE TRIGGER bench_trig_fan_out AFTER INSERT ON bench_trig_messages BEGIN"
    " INSERT OR IGNORE INTO bench_trig_deliveries (seq, grp, topic, slot, visible_at)"
    " SELECT NEW.seq, g.grp, NEW.topic, NEW.partition_hash % g.slots, NEW.visible_after"
    " FROM queue_groups g WHERE g.topic = NEW.topic; END",
)


class PublishShapes:
    """Raw-driver publishes on ``backend`` (whose queue tables exist and have a group on
    ``TOPIC``, see ``prepare``)."""

    def __init__(self, backend: Backend, seconds: float) -> None:
        self.backend = backend
        self.seconds = seconds
        self.sqlite = backend.name == "sqlite"
        self.mark = "?" if self.sqlite else "%s"
        self.ignore = "INSERT OR IGNORE" if self.sqlite else "INSERT IGNORE"
        self._serial = itertools.count()
        self._lock: AbstractContextManager[Any] = threading.Lock() if self.sqlite else nullcontext()
        conn = backend.raw_connect(autocommit=True)
        try:
            for ddl in _SQLITE_SETUP if self.sqlite else _MYSQL_SETUP:
                _run(conn, ddl)
            _run(
                conn,
                f"{self.ignore} INTO queue_groups (topic, grp, slots, ready, created_at)"
                f" VALUES ({self.mark}, 'bench', 64, 1, 0)",
                (TOPIC,),
            )
        finally:
            conn.close()

    def _row(self) -> tuple[Any, ...]:
        n = next(self._serial)
        key = f"sim-{n % 64}"
        token = random.getrandbits(62) + 1
        return (TOPIC, key, f"{key}/poll/{n}", n % 1000, b'{"id": "x"}', "{}", 0, 0, token)

    def statements(self, connections: int) -> float:
        """INSERT IGNORE message + INSERT IGNORE … SELECT fan-out + COMMIT, per publish."""
        values = ", ".join([self.mark] * 9)
        insert = f"{self.ignore} INTO queue_messages ({_COLUMNS}) VALUES ({values})"
        fan_out = (  # only placeholders are interpolated; values are bound
            f"{self.ignore} INTO queue_deliveries (seq, grp, topic, slot, visible_at)"  # noqa: S608
            " SELECT m.seq, g.grp, m.topic, m.partition_hash % g.slots, m.visible_after"
            " FROM queue_messages m JOIN queue_groups g ON g.topic = m.topic"
            f" WHERE m.seq = {self.mark}"
        )
        if not self.sqlite:
            fan_out = fan_out.replace("% g.slots", "%% g.slots")

        def op(conn: Any) -> int:
            with self._lock:
                cur = conn.cursor()
                if self.sqlite:
                    cur.execute("BEGIN IMMEDIATE")
                cur.execute(insert, self._row())
                cur.execute(fan_out, (cur.lastrowid,))
                if self.sqlite:
                    cur.execute("COMMIT")
                else:
                    conn.commit()
                cur.close()
            return 1

        return self._measure(connections, op, autocommit=False)

    def trigger(self, connections: int) -> float:
        """One autocommitted INSERT; an AFTER INSERT trigger writes the deliveries."""
        values = ", ".join([self.mark] * 9)
        insert = f"{self.ignore} INTO bench_trig_messages ({_COLUMNS}) VALUES ({values})"

        def op(conn: Any) -> int:
            with self._lock:
                cur = conn.cursor()
                cur.execute(insert, self._row())
                cur.close()
            return 1

        return self._measure(connections, op, autocommit=True)

    def _measure(self, connections: int, op: Any, *, autocommit: bool) -> float:
        conns: dict[int, Any] = {}

        def setup(index: int) -> None:
            conns[index] = self.backend.raw_connect(autocommit=autocommit)

        try:
            return run_threads(connections, self.seconds, lambda i: op(conns[i]), setup=setup)
        finally:
            for conn in conns.values():
                conn.close()


def _run(conn: Any, sql: str, params: tuple[Any, ...] | None = None) -> None:
    cur = conn.cursor()
    try:
        if params is None:  # no formatting: the DDL holds a literal %
            cur.execute(sql)
        else:
            cur.execute(sql, params)
    finally:
        cur.close()
