"""Engines, ``Database`` and ``DbClock``, and the one place driver errors become buildq errors.

MySQL/MariaDB connections run READ COMMITTED (short claim transactions, no gap locks) with the
session clock in UTC; SQLite runs in WAL mode with a busy timeout, and every write transaction
starts with BEGIN IMMEDIATE so two writers queue on the lock instead of deadlocking on upgrade.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_random_exponential

from buildq.storage.dialect import db_now_ms
from buildq.storage.errors import DatabaseMissing, StorageError, TransientQueueError, first_line

SQLITE_BUSY_TIMEOUT_MS = 15_000
MYSQL_LOCK_WAIT_TIMEOUT_S = 10
MYSQL_CONNECT_TIMEOUT_S = 5
MYSQL_READ_TIMEOUT_S = 60

#: Execution option: a SQLite transaction that only reads starts with a deferred BEGIN.
READ_ONLY = "buildq_read_only"

# MySQL error codes worth retrying: deadlock, lock wait timeout, server gone / lost / refused,
# read-only during failover, too many connections.
_MYSQL_TRANSIENT = {1213, 1205, 2002, 2003, 2006, 2013, 2014, 2055, 1290, 1040, 1927, 4031}
# A storage fault an operator can fix, and then the same write succeeds: disk full (1021),
# table full (1114: the disk, or a size limit), out of memory/resources (1037, 1041). Retried
# with back-off, never turned into a message's failure.
_MYSQL_STORAGE = {1021, 1114, 1037, 1041}
_SQLITE_TRANSIENT = re.compile(r"locked|busy|disk is full|disk I/O error", re.IGNORECASE)


def create_engine(url: str, *, pool_size: int = 10, create: bool = False) -> Engine:
    """An engine for ``url`` with buildq's session settings; nothing is connected yet.

    A SQLite file is created (with its directory) only with ``create``, which migrations
    pass; otherwise a missing file raises DatabaseMissing, now and on every later connect.
    """
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = parsed.database
        if path in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite database cannot be shared: give a file path")
        if create:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        elif not Path(path).is_file():
            raise DatabaseMissing(path)
        return _sqlite_engine(url, path, pool_size, create=create)
    if parsed.get_backend_name() in ("mysql", "mariadb"):
        return _mysql_engine(parsed, pool_size)
    raise ValueError(
        f"unsupported database {parsed.get_backend_name()!r}: use mysql+pymysql, mysql+mysqldb or sqlite"
    )


def _sqlite_engine(url: str, path: str, pool_size: int, *, create: bool) -> Engine:
    # mode=rw opens an existing file and never creates one (the check in create_engine could
    # race a deletion); rwc is sqlite3's default, for migrations only.
    uri = f"file:{quote(path)}?mode={'rwc' if create else 'rw'}"

    def connect() -> sqlite3.Connection:
        return sqlite3.connect(
            uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, check_same_thread=False
        )

    engine = sa.create_engine(url, creator=connect, pool_size=pool_size, max_overflow=pool_size)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: sqlite3.Connection, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves, below
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        read_only = conn.get_execution_options().get(READ_ONLY, False)
        conn.exec_driver_sql("BEGIN" if read_only else "BEGIN IMMEDIATE")

    return engine


def _mysql_engine(url: sa.URL, pool_size: int, *, autocommit: bool = False) -> Engine:
    init = f"SET time_zone = '+00:00', innodb_lock_wait_timeout = {MYSQL_LOCK_WAIT_TIMEOUT_S}"
    engine = sa.create_engine(
        url.update_query_dict({"charset": "utf8mb4"}),
        isolation_level="AUTOCOMMIT" if autocommit else "READ COMMITTED",
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping and no rollback-on-return: each costs a round trip per transaction, and
        # every transaction here ends in an explicit commit or rollback anyway. A dead
        # connection fails its statement, the pool is invalidated, and the retry reconnects.
        pool_pre_ping=False,
        pool_reset_on_return=None,
        pool_recycle=3600,
        connect_args={
            "init_command": init,
            "connect_timeout": MYSQL_CONNECT_TIMEOUT_S,
            "read_timeout": MYSQL_READ_TIMEOUT_S,
            "write_timeout": MYSQL_READ_TIMEOUT_S,
        },
    )
    if autocommit:
        # Every statement on this pool commits by itself; SQLAlchemy would still send COMMIT
        # or ROLLBACK when a connection's block ends: one wasted round trip per read.
        setattr(engine.dialect, "do_commit", _no_op)  # noqa: B010 (a method of this engine's own dialect)
        setattr(engine.dialect, "do_rollback", _no_op)  # noqa: B010
    return engine


def _no_op(_dbapi_connection: Any) -> None:
    pass


def is_transient(err: BaseException) -> bool:
    """Would trying the same transaction again plausibly succeed?"""
    if isinstance(err, TransientQueueError):
        return True
    if not isinstance(err, DBAPIError):
        return False
    if err.connection_invalidated:
        return True
    orig = err.orig
    if isinstance(orig, sqlite3.OperationalError):
        return bool(_SQLITE_TRANSIENT.search(str(orig)))
    code = orig.args[0] if orig is not None and orig.args else None
    if code == 1030:  # "Got error N from storage engine": 28 is ENOSPC, a full disk
        return " 28 " in f" {orig} "
    return isinstance(code, int) and (code in _MYSQL_TRANSIENT or code in _MYSQL_STORAGE)


@contextmanager
def translated_errors() -> Iterator[None]:
    """Turn driver errors into TransientQueueError / StorageError, keeping the cause."""
    try:
        yield
    except (TransientQueueError, StorageError):
        raise
    except IntegrityError as err:
        raise StorageError(f"integrity error: {first_line(err)}") from err
    except (OperationalError, DBAPIError) as err:
        if is_transient(err):
            raise TransientQueueError(f"database unavailable: {first_line(err)}") from err
        raise StorageError(f"database error: {first_line(err)}") from err
    except SQLAlchemyError as err:
        raise StorageError(f"database error: {first_line(err)}") from err


def backend_name(engine: Engine) -> str:
    """'sqlite' or 'mysql' (MariaDB included)."""
    return "sqlite" if engine.dialect.name == "sqlite" else "mysql"


def redacted_url(url: str) -> str:
    """The URL with any password masked: for logs and error messages."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except (sa.exc.ArgumentError, ValueError):  # ValueError: a port that is not a number
        return "<unparseable database URL>"


T = TypeVar("T")


class Database:
    """An engine plus the transaction helpers every store uses.

    ``write``/``read`` run a function in one transaction and run it again on transient
    errors (deadlock, lock timeout, lost connection, SQLite busy), so callers never see those
    unless the database stays unavailable. Functions passed here must therefore be safe to
    repeat: everything buildq writes is keyed or conditional, so a repeat is a no-op.
    """

    def __init__(self, engine: Engine, *, retry_for_s: float = 30.0) -> None:
        self.engine = engine
        self.backend = backend_name(engine)
        # Single-statement reads on MySQL go through an autocommit pool: no COMMIT round trip.
        self.read_engine = (
            _mysql_engine(engine.url, engine.pool.size(), autocommit=True)  # type: ignore[attr-defined]
            if self.backend == "mysql"
            else engine
        )
        # SQLite has one writer at a time. Threads of one process queue on this lock instead
        # of on SQLite's busy handler, whose sleeps (1 ms growing to 100 ms) collapse write
        # throughput under contention; other processes still wait on the busy timeout.
        self._write_lock: AbstractContextManager[Any] = (
            threading.Lock() if self.backend == "sqlite" else nullcontext()
        )
        self._retry_policy = Retrying(
            retry=retry_if_exception_type(TransientQueueError),
            stop=stop_after_delay(retry_for_s),
            wait=wait_random_exponential(multiplier=0.02, max=2.0),
            reraise=True,
        )

    def write(self, fn: Callable[[Connection], T], *, retry_for_s: float | None = None) -> T:
        """Run ``fn`` in a write transaction; transient errors are retried for this database's
        ``retry_for_s`` (or the one given: a loop that tries again on its own passes less)."""
        return self.retrying(lambda: self._once(fn, read_only=False), retry_for_s)

    def read(self, fn: Callable[[Connection], T]) -> T:
        """Run reads; on MySQL each statement sees its own snapshot (autocommit): a read that
        needs several statements to agree must use ``write`` or one statement."""
        return self.retrying(lambda: self._once(fn, read_only=True))

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One write transaction, errors translated, no retry (the caller decides)."""
        with self._write_lock, translated_errors(), self.engine.begin() as conn:
            yield conn

    def _once(self, fn: Callable[[Connection], T], *, read_only: bool) -> T:
        with nullcontext() if read_only else self._write_lock, translated_errors():
            conn = (self.read_engine if read_only else self.engine).connect()
            try:
                if read_only:
                    conn = conn.execution_options(**{READ_ONLY: True})
                with conn.begin():
                    return fn(conn)
            finally:
                conn.close()

    def retrying(self, attempt: Callable[[], T], retry_for_s: float | None = None) -> T:
        policy = self._retry_policy.copy()
        if retry_for_s is not None:
            policy = policy.copy(stop=stop_after_delay(retry_for_s))
        return policy(attempt)

    def dispose(self) -> None:
        self.engine.dispose()
        if self.read_engine is not self.engine:
            self.read_engine.dispose()


class DbClock:
    """The database's clock without a round trip per reading.

    Deadlines are compared against the database's time (the one clock every daemon shares);
    reading it costs a query, so it is read every ``refresh_s`` and advanced in between by
    this host's *monotonic* clock. The host's wall clock is never used: a step of it (NTP, a
    VM resumed) must not make young builds look hours old. A step of the database host's
    clock does show, from the next reading on (docs/scaling.md, "Clocks").
    """

    def __init__(
        self,
        db: Database,
        *,
        refresh_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._db = db
        self._refresh_s = refresh_s
        self._monotonic = monotonic
        self._db_ms = 0.0  # the database's clock at _measured_at
        self._measured_at = float("-inf")
        self._lock = threading.Lock()

    def now_ms(self) -> int:
        with self._lock:
            if self._monotonic() - self._measured_at > self._refresh_s:
                self._measure()
            return int(self._db_ms + (self._monotonic() - self._measured_at) * 1000)

    def _measure(self) -> None:
        before = self._monotonic()
        db_now = self._db.read(lambda conn: conn.execute(sa.select(db_now_ms())).scalar_one())
        after = self._monotonic()
        # The reading was taken about halfway through the round trip.
        self._db_ms = float(db_now)
        self._measured_at = (before + after) / 2
