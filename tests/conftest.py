"""The fixtures every tier shares: a migrated database on each backend and the test's views of
it (a queue, subscriptions, the builds), and the CLI run in this process.

``backend_url`` is parametrised over SQLite (always) and MySQL/MariaDB (when
BUILDQ_TEST_MYSQL_URL is set; see tests/support/database.py for what CI=true changes).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from buildq.db import Database, create_engine
from buildq.migrations import upgrade
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription
from tests.support.cli import CliResult, run_cli
from tests.support.daemon import World
from tests.support.database import BACKENDS, FAST, clean_tables, require_mysql


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    return require_mysql()


@pytest.fixture(scope="session")
def mysql_test_url(mysql_server_url: str) -> Iterator[str]:
    """A private, migrated database on the MySQL server for this test session."""
    server = sa.make_url(mysql_server_url)
    name = f"buildq_test_{secrets.token_hex(4)}"
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = server.set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
    admin.dispose()


@pytest.fixture
def mysql_url(mysql_test_url: str) -> str:
    """The session's MySQL database, emptied for this test."""
    clean_tables(mysql_test_url)
    return mysql_test_url


@pytest.fixture(params=BACKENDS)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database URL: a fresh SQLite file, or the session's MySQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'buildq.db'}"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("mysql_url")
    return url


@pytest.fixture
def db(backend_url: str) -> Iterator[Database]:
    database = Database(create_engine(backend_url), retry_for_s=10)
    yield database
    database.dispose()


@pytest.fixture
def queue(db: Database) -> Iterator[SqlQueue]:
    q = SqlQueue(db)
    yield q
    q.close()


@pytest.fixture
def subscribe(queue: SqlQueue) -> Iterator[Callable[..., SqlSubscription]]:
    """``subscribe(topic, group="g", settings=FAST)``: closed at the end of the test."""
    opened: list[SqlSubscription] = []

    def _subscribe(
        topic: str, group: str = "g", settings: SubscriptionSettings = FAST, **kw: object
    ) -> SqlSubscription:
        sub = queue.subscribe(topic, group, settings, **kw)  # type: ignore[arg-type]
        opened.append(sub)
        return sub

    yield _subscribe
    for sub in opened:
        with contextlib.suppress(Exception):
            sub.close()


@pytest.fixture
def world(backend_url: str) -> Iterator[World]:
    """The test's view of the database a daemon (or the CLI) works on."""
    w = World(backend_url)
    yield w
    w.close()


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """``cli("builds", "show", X)``: ``buildq`` in this process with ``--url`` of the test's
    database appended; a traceback on stderr fails the test."""

    def run(*argv: str, url: bool = True) -> CliResult:
        result = run_cli([*argv, "--url", backend_url] if url else argv, capsys)
        assert "Traceback" not in result.err, result.err[-3000:]
        return result

    return run


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """In-process CLI runs configure logging; every test starts from structlog's defaults."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
