"""The databases the benchmarks run on: a backend's URL and raw-driver connector, a fresh
migrated database per benchmark (dropped afterwards, or by the next run if this one died), and
telling a lost server from any other failure."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.report import log
from buildq.migrations import upgrade
from buildq.storage.database import Database, create_engine

DEFAULT_MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
BACKENDS = ("mysql", "sqlite")


@dataclass
class Backend:
    """One database to benchmark against: its SQLAlchemy URL and a raw-driver connector."""

    name: str  # "mysql" or "sqlite"
    url: str
    sqlite_path: Path | None = None
    mysql_params: dict[str, Any] = field(default_factory=dict)

    def database(self, pool_size: int = 20) -> Database:
        return Database(create_engine(self.url, pool_size=pool_size))

    def raw_connect(self, *, autocommit: bool) -> Any:
        """A plain PyMySQL or sqlite3 connection with the session settings buildq uses."""
        if self.name == "sqlite":
            assert self.sqlite_path is not None
            conn = sqlite3.connect(
                self.sqlite_path, isolation_level=None, check_same_thread=False, timeout=15
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=15000")
            return conn
        import pymysql

        conn = pymysql.connect(
            **self.mysql_params,
            autocommit=autocommit,
            charset="utf8mb4",
            init_command="SET time_zone = '+00:00'",
        )
        with conn.cursor() as cur:
            cur.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
        return conn


def mysql_server_url() -> str:
    return os.environ.get(
        "BUILDQ_BENCH_MYSQL_URL", os.environ.get("BUILDQ_TEST_MYSQL_URL", DEFAULT_MYSQL_URL)
    )


def mysql_available() -> str | None:
    """None if the MariaDB/MySQL server answers, else why not."""
    try:
        engine = sa.create_engine(mysql_server_url(), connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        engine.dispose()
    except Exception as err:
        return str(err).splitlines()[0][:200]
    return None


@contextlib.contextmanager
def fresh_database(backend: str, tag: str) -> Iterator[Backend]:
    """An empty, migrated database of its own, dropped afterwards."""
    if backend == "sqlite":
        directory = Path(tempfile.mkdtemp(prefix=f"buildq-bench-{tag}-"))
        path = directory / "bench.db"
        url = f"sqlite:///{path}"
        try:
            upgrade(url)
            yield Backend("sqlite", url, sqlite_path=path)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        return
    server = sa.make_url(mysql_server_url())
    name = f"buildq_bench_{os.getpid()}_{tag}"
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        conn.exec_driver_sql(f"CREATE DATABASE `{name}`")
    url = server.set(database=name).render_as_string(hide_password=False)
    params = {
        "host": server.host or "127.0.0.1",
        "port": server.port or 3306,
        "user": server.username or "root",
        "password": server.password or "",
        "database": name,
    }
    try:
        upgrade(url)
        yield Backend("mysql", url, mysql_params=params)
    finally:
        try:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        except sa.exc.DBAPIError as err:  # the server went away: the next run drops it
            log(f"could not drop {name}: {str(err).splitlines()[0][:200]}")
        admin.dispose()


def drop_stale_databases() -> None:
    """Drop ``buildq_bench_<pid>_*`` databases left by runs that died (their pid is gone)."""
    engine = sa.create_engine(mysql_server_url())
    try:
        with engine.begin() as conn:
            names = conn.exec_driver_sql("SHOW DATABASES LIKE 'buildq\\_bench\\_%%'").scalars()
            for name in list(names):
                pid = name.split("_")[2]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
                    log(f"dropped {name}, left by a run that is gone")
    finally:
        engine.dispose()


def server_lost(err: BaseException) -> bool:
    """Did this fail because the MariaDB/MySQL server went away (restarted, refused)?"""
    seen: BaseException | None = err
    while seen is not None:
        text = str(seen)
        if any(code in text for code in ("(2003,", "(2006,", "(2013,", "(2055,")):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
