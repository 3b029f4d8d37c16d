"""Every SQL difference between MySQL/MariaDB and SQLite that buildq's statements need.

Nothing else in the queue or the build store branches on the dialect: statements are built once
from these constructs and compile to the right text for whichever engine runs them. (Engine
options, the other difference, are ``database``'s.)
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert, Table, insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import BigInteger


class db_now_ms(FunctionElement[int]):
    """The database server's clock in epoch milliseconds: the one clock of the queue and the
    build store."""

    type = BigInteger()
    inherit_cache = True
    name = "db_now_ms"


@compiles(db_now_ms, "mysql")
@compiles(db_now_ms, "mariadb")
def _now_mysql(element: db_now_ms, compiler: SQLCompiler, **kw: Any) -> str:
    # Connections run with time_zone '+00:00', so NOW(3) converts back to epoch exactly,
    # even across the host's DST changes.
    return "CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)"


@compiles(db_now_ms, "sqlite")
def _now_sqlite(element: db_now_ms, compiler: SQLCompiler, **kw: Any) -> str:
    # julianday('now') is fixed for the whole statement, like NOW() on MySQL.
    return "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)"


def insert_ignore(table: Table) -> Insert:
    """INSERT that silently skips rows whose unique key exists; rowcount says how many went in."""
    return (
        insert(table)
        .prefix_with("IGNORE", dialect="mysql")
        .prefix_with("IGNORE", dialect="mariadb")
        .prefix_with("OR IGNORE", dialect="sqlite")
    )


# --- hand-rendered statements of the batched hot path ------------------------------------------
#
# Statements whose shape depends on the batch size (a CASE per row, a VALUES row per message)
# are rendered as text once per (dialect, size) by the queue's ``batch_queries`` and the build
# store's ``sqlbatch``; these are the pieces of that text that differ between the dialects.


def placeholder(dialect: Dialect) -> str:
    """The DBAPI's positional parameter marker: ``?`` for sqlite3, ``%s`` for the MySQL
    drivers (whose format style also makes a literal ``%`` in such text ``%%``)."""
    return "?" if dialect.name == "sqlite" else "%s"


def now_ms_sql(dialect: Dialect) -> str:
    """``db_now_ms()`` as SQL text for ``dialect``."""
    return str(db_now_ms().compile(dialect=dialect))


def insert_ignore_sql(dialect: Dialect) -> str:
    """The words that start an INSERT that skips rows whose unique key exists."""
    return "INSERT OR IGNORE" if dialect.name == "sqlite" else "INSERT IGNORE"


def first_inserted_seq(dialect: Dialect, lastrowid: int, inserted: int) -> int:
    """The offset of the first row a multi-row INSERT wrote. MySQL's ``lastrowid`` is the
    first AUTO_INCREMENT value of the statement; SQLite's is the last rowid, and a single
    writer's new rowids are consecutive."""
    return lastrowid - inserted + 1 if dialect.name == "sqlite" else lastrowid


def updates_row_by_row(dialect: Dialect) -> bool:
    """Whether a batch's per-row UPDATEs and DELETEs are best sent as one prepared statement
    run once per row (``executemany``) rather than one statement with a ``CASE`` arm per row.
    SQLite runs in this process, so a row costs a B-tree lookup and no round trip, while a
    CASE is evaluated arm by arm for every row (quadratic in the batch); over a network one
    statement is one round trip, and MySQL's executemany is one statement per row."""
    return dialect.name == "sqlite"
