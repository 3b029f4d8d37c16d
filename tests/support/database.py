"""The databases tests run on: SQLite always, MySQL/MariaDB when ``BUILDQ_TEST_MYSQL_URL`` says
where. The fixtures built on these are in tests/conftest.py.

Without that variable MySQL tests skip with a visible reason — except under CI=true, where a
missing or unreachable MySQL fails them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from buildq.queue.settings import Backoff, SubscriptionSettings
from buildq.storage.database import create_engine

MYSQL_URL_ENV = "BUILDQ_TEST_MYSQL_URL"

#: The parameters of every fixture that runs a test on each backend.
BACKENDS = ["sqlite", pytest.param("mysql", marks=pytest.mark.mysql)]

#: Every table, children before parents; the session's MySQL database is emptied between tests.
TABLES_IN_DELETE_ORDER = (
    "queue_deliveries",
    "queue_messages",
    "queue_leases",
    "queue_groups",
    "queue_subscribers",
    "builds",
)

#: Subscription settings that make the SQL queue's tests quick: short leases, fast polls, no
#: jitter in the back-off.
FAST = SubscriptionSettings(
    slots=8,
    lease_duration_ms=2_000,
    renew_interval_ms=200,
    heartbeat_stale_ms=2_000,
    visibility_timeout_ms=30_000,
    max_attempts=3,
    backoff=Backoff(initial_ms=10, multiplier=2.0, cap_ms=100, jitter=0.0),
    poll_interval_ms=20,
    batch_size=32,
)


def require_mysql() -> str:
    """The MySQL server's URL; skip the test without one (fail it under CI=true)."""
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


def clean_tables(url: str) -> None:
    """Delete every row of every table the database has."""
    engine = create_engine(url, pool_size=1)
    existing = set(sa.inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in TABLES_IN_DELETE_ORDER:
            if table in existing:
                conn.exec_driver_sql(f"DELETE FROM {table}")  # noqa: S608 (our own names)
    engine.dispose()


@contextmanager
def private_database(
    server_url: str, prefix: str, *, charset: bool = True, keep: bool = False
) -> Iterator[str]:
    """A new, empty database of its own on the MySQL server (utf8mb4_bin unless ``charset`` is
    False: the server's default), dropped afterwards unless ``keep``."""
    server = sa.make_url(server_url)
    name = f"{prefix}_{secrets.token_hex(4)}"
    options = " CHARACTER SET utf8mb4 COLLATE utf8mb4_bin" if charset else ""
    admin = sa.create_engine(server, pool_pre_ping=True)  # the server may restart meanwhile
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name}{options}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        if not keep:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()
