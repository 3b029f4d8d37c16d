"""Column types and table options every buildq table uses, and the name limits they impose.

Alembic migrations own the live schema; the tables (``buildq.queue.sql.schema``,
``buildq.orchestrator.schema``) are the models the migrations must equal.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import BigInteger, Integer, LargeBinary, Text
from sqlalchemy.dialects import mysql

# Binary collation on MySQL: ids "Build-1" and "build-1" are different messages.
MYSQL_TABLE_ARGS: dict[str, Any] = {"mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}

SeqType = BigInteger().with_variant(Integer, "sqlite")  # SQLite: INTEGER PRIMARY KEY = rowid
PayloadType = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")
LongText = Text().with_variant(mysql.MEDIUMTEXT(), "mysql", "mariadb")

#: Longest queue and runner names the builds table can hold: config and request decoding refuse
#: longer ones, which MySQL would otherwise cut short.
QUEUE_NAME_MAX = 100
RUNNER_NAME_MAX = 64
