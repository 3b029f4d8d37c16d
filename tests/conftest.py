"""Shared fixtures: a migrated database on each backend, and waiting with a deadline.

``backend_url`` is parametrised over SQLite (always) and MySQL/MariaDB (when
BUILDQ_TEST_MYSQL_URL is set). Without that variable MySQL tests skip with a visible reason —
except under CI=true, where a missing or unreachable MySQL fails them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import sqlalchemy as sa

from buildq.db import Database, create_engine
from buildq.migrations import upgrade
from tests.support.waiting import wait_until

T = TypeVar("T")

MYSQL_URL_ENV = "BUILDQ_TEST_MYSQL_URL"
TABLES_IN_DELETE_ORDER = (
    "queue_deliveries",
    "queue_messages",
    "queue_leases",
    "queue_groups",
    "queue_subscribers",
)


def _require_mysql() -> str:
    url = os.environ.get(MYSQL_URL_ENV)
    in_ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
    if not url:
        if in_ci:
            pytest.fail(f"{MYSQL_URL_ENV} is not set but CI=true: MySQL tests must run in CI")
        pytest.skip(
            f"MySQL tests need {MYSQL_URL_ENV} (e.g. mysql+pymysql://root@127.0.0.1:3306/test)"
        )
    try:
        engine = sa.create_engine(url)
        with engine.connect():
            pass
        engine.dispose()
    except sa.exc.OperationalError as err:
        message = f"MySQL at {MYSQL_URL_ENV} is unreachable: {str(err.orig)[:200]}"
        if in_ci:
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture(scope="session")
def mysql_server_url() -> str:
    return _require_mysql()


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


def clean_tables(url: str) -> None:
    engine = create_engine(url, pool_size=1)
    inspector_tables = set(sa.inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in TABLES_IN_DELETE_ORDER + extra_tables():
            if table in inspector_tables:
                conn.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608 (our own names)
    engine.dispose()


def extra_tables() -> tuple[str, ...]:
    """Tables of later migrations (the build store), cleaned between tests too."""
    return ("build_requests", "builds")


@pytest.fixture(params=["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database URL: a fresh SQLite file, or the session's MySQL database."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'buildq.db'}"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("mysql_test_url")
    clean_tables(url)
    return url


@pytest.fixture
def db(backend_url: str) -> Iterator[Database]:
    database = Database(create_engine(backend_url), retry_for_s=10)
    yield database
    database.dispose()


@pytest.fixture
def wait() -> Callable[..., object]:
    return wait_until


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """In-process CLI runs configure logging; every test starts from structlog's defaults."""
    import structlog

    structlog.reset_defaults()
    yield
    structlog.reset_defaults()
