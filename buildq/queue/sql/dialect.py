"""Every SQL difference between MySQL/MariaDB and SQLite that the queue's statements need.

Nothing else in the queue branches on the dialect: statements are built once from these
constructs and compile to the right text for whichever engine runs them.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Insert, Table, insert
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import BigInteger


class db_now_ms(FunctionElement[int]):
    """The database server's clock in epoch milliseconds: the one clock of the queue."""

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
