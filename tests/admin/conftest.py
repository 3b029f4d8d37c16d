"""Running the admin CLI in-process against each backend, and snapshots of the queue tables.

``cli("queue", "topics", "--json")`` runs ``buildq.cli.main`` with ``--url`` of the test's
database appended, returns exit code, stdout, stderr and (for ``--json``) the parsed output.
Unlike tests/conftest.py's ``cli`` it can answer the confirmation prompt (``stdin=``), and
what the command prints on stderr is the test's to judge.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
import sqlalchemy as sa

from buildq.db import Database
from buildq.queue import Message
from buildq.queue.sql.schema import metadata
from tests.support.cli import CliResult, run_cli

QUEUE_TABLES = ("queue_messages", "queue_groups", "queue_deliveries", "queue_leases")


Result = CliResult

Cli = Callable[..., Result]


class Terminal(io.StringIO):
    """A stdin that says it is a TTY, answering the confirmation prompt with ``answer``."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> Cli:
    def run(*argv: str, stdin: io.StringIO | None = None, url: bool = True) -> Result:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", stdin)
        return run_cli([*argv, "--url", backend_url] if url else argv, capsys)

    return run


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
