"""The physical ceiling: what the raw driver does on the same backend with the same connections.

(a) ``insert``: one single-row INSERT, autocommitted — the least a durable publish can cost.
(b) ``txn``: UPDATE one row + INSERT one row + COMMIT — the least "ack + publish_after" can cost.

PyMySQL on MariaDB, sqlite3 on SQLite, one connection per thread, no SQLAlchemy. Each thread
updates its own row (an ack never contends with another worker's ack either). On SQLite the
threads take turns on an in-process lock, as buildq's own writers do (SQLite has one writer at
a time, and its busy handler's sleeps would only make the ceiling lower). Rows carry a short key
and a ~40-byte payload, like a poll message.
"""

from __future__ import annotations

import threading
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from bench.databases import Backend
from bench.report import Result
from bench.timing import run_threads

_MYSQL_TABLES = (
    "CREATE TABLE IF NOT EXISTS bench_ceiling_rows (id BIGINT AUTO_INCREMENT PRIMARY KEY,"
    " k VARCHAR(191) NOT NULL, payload BLOB NOT NULL, created_at BIGINT NOT NULL)"
    " ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin",
    "CREATE TABLE IF NOT EXISTS bench_ceiling_cells (id INT PRIMARY KEY, n BIGINT NOT NULL)"
    " ENGINE=InnoDB",
)
_SQLITE_TABLES = (
    "CREATE TABLE IF NOT EXISTS bench_ceiling_rows (id INTEGER PRIMARY KEY,"
    " k VARCHAR(191) NOT NULL, payload BLOB NOT NULL, created_at BIGINT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS bench_ceiling_cells (id INT PRIMARY KEY, n BIGINT NOT NULL)",
)
PAYLOAD = b'{"id": "sim-1700000000000-1000-5000-p-0123456789abcdef"}'[:40]


class Ceiling:
    """Measures (a) and (b) on one backend; results are kept by (shape, connections)."""

    def __init__(self, backend: Backend, seconds: float) -> None:
        self.backend = backend
        self.seconds = seconds
        self.measured: dict[str, float] = {}
        self._lock: AbstractContextManager[Any] = (
            threading.Lock() if backend.name == "sqlite" else nullcontext()
        )
        conn = backend.raw_connect(autocommit=True)
        try:
            for ddl in _SQLITE_TABLES if backend.name == "sqlite" else _MYSQL_TABLES:
                _execute(conn, ddl)
        finally:
            conn.close()

    def insert(self, connections: int) -> float:
        """(a): single-row autocommitted INSERTs per second over ``connections``."""
        rate = self._measure(connections, autocommit=True, op=self._insert_once)
        self.measured[f"a{connections}"] = rate
        return rate

    def txn(self, connections: int) -> float:
        """(b): UPDATE + INSERT + COMMIT transactions per second over ``connections``."""
        rate = self._measure(connections, autocommit=False, op=self._txn_once)
        self.measured[f"b{connections}"] = rate
        return rate

    def _measure(self, connections: int, *, autocommit: bool, op: Any) -> float:
        conns: dict[int, Any] = {}

        def setup(index: int) -> None:
            conn = self.backend.raw_connect(autocommit=autocommit)
            conns[index] = conn
            with self._lock:
                _execute(conn, self._upsert_cell(), (index,))
                if self.backend.name == "mysql" and not autocommit:
                    conn.commit()

        try:
            return run_threads(
                connections, self.seconds, lambda i: op(conns[i], i), setup=setup, warmup_s=0.2
            )
        finally:
            for conn in conns.values():
                conn.close()

    def _upsert_cell(self) -> str:
        if self.backend.name == "sqlite":
            return "INSERT OR IGNORE INTO bench_ceiling_cells (id, n) VALUES (?, 0)"
        return "INSERT IGNORE INTO bench_ceiling_cells (id, n) VALUES (%s, 0)"

    def _insert_once(self, conn: Any, index: int) -> int:
        if self.backend.name == "sqlite":
            with self._lock:
                conn.execute(
                    "INSERT INTO bench_ceiling_rows (k, payload, created_at) VALUES (?, ?, ?)",
                    (f"build-{index}", PAYLOAD, 0),
                )
            return 1
        with conn.cursor() as cur:
            cur.execute(
                "INSERT INTO bench_ceiling_rows (k, payload, created_at) VALUES (%s, %s, %s)",
                (f"build-{index}", PAYLOAD, 0),
            )
        return 1

    def _txn_once(self, conn: Any, index: int) -> int:
        if self.backend.name == "sqlite":
            with self._lock:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("UPDATE bench_ceiling_cells SET n = n + 1 WHERE id = ?", (index,))
                conn.execute(
                    "INSERT INTO bench_ceiling_rows (k, payload, created_at) VALUES (?, ?, ?)",
                    (f"build-{index}", PAYLOAD, 0),
                )
                conn.execute("COMMIT")
            return 1
        with conn.cursor() as cur:
            cur.execute("UPDATE bench_ceiling_cells SET n = n + 1 WHERE id = %s", (index,))
            cur.execute(
                "INSERT INTO bench_ceiling_rows (k, payload, created_at) VALUES (%s, %s, %s)",
                (f"build-{index}", PAYLOAD, 0),
            )
        conn.commit()
        return 1


def _execute(conn: Any, sql: str, params: tuple[Any, ...] = ()) -> None:
    """One statement on a raw PyMySQL or sqlite3 connection (both have cursors)."""
    cur = conn.cursor()
    try:
        cur.execute(sql, params)
    finally:
        cur.close()


def run(backend: Backend, seconds: float, connections: tuple[int, ...]) -> Result:
    """The ceiling table on its own: (a) and (b) at each connection count."""
    ceiling = Ceiling(backend, seconds)
    metrics: dict[str, float] = {}
    for n in connections:
        metrics[f"insert_c{n}"] = ceiling.insert(n)
        metrics[f"txn_c{n}"] = ceiling.txn(n)
    first = connections[0]
    return Result(
        bench="ceiling",
        backend=backend.name,
        metrics=metrics,
        ceiling={},
        ratio=metrics[f"txn_c{first}"] / metrics[f"insert_c{first}"],
        ratio_means=f"(b)/(a) at {first} connection(s)",
    )
