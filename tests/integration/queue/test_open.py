"""``buildq.queue.open``, the public way into the queue: it works on a database ``buildq db
upgrade`` made, refuses anything else with that command in the message, and never creates a
file or a table of its own."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

import buildq.queue
from buildq.queue import Message, NotMigrated
from tests.support.database import FAST, private_database


def test_open_a_migrated_database_publishes_and_delivers(backend_url: str) -> None:
    queue = buildq.queue.open(backend_url)
    try:
        sub = queue.subscribe("jobs", "g", FAST)
        try:
            queue.publish("jobs", Message(id="j1", payload=b"x", partition_key="p"))
            [delivery] = sub.fetch(10)
            assert delivery.message.id == "j1"
        finally:
            sub.close()
        assert queue.db.engine.pool.checkedin() > 0
    finally:
        queue.close()
    # The queue made its engine, so closing it returns the connections.
    assert queue.db.engine.pool.checkedin() == 0


def test_a_missing_sqlite_file_is_refused_and_not_created(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "buildq.db"
    with pytest.raises(NotMigrated, match=r"buildq db upgrade"):
        buildq.queue.open(f"sqlite:///{path}")
    assert not path.parent.exists()


def test_an_empty_sqlite_file_is_refused_and_left_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.db"
    sqlite3.connect(path).close()
    with pytest.raises(NotMigrated, match=r"no buildq schema.*buildq db upgrade"):
        buildq.queue.open(f"sqlite:///{path}")
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM sqlite_master").fetchone() == (0,)


def test_an_empty_mysql_database_is_refused_and_left_empty(mysql_server_url: str) -> None:
    with private_database(mysql_server_url, "buildq_open") as url:
        with pytest.raises(NotMigrated, match=r"no buildq schema.*buildq db upgrade"):
            buildq.queue.open(url)
        engine = sa.create_engine(url)
        try:
            assert sa.inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
