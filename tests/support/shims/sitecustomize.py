"""Faults of the host, injected inside a daemon process (issue 14): imported by Python at
start-up when ``tests/support/shims`` is on PYTHONPATH (see ``tests.support.shims.env``). Each
fault is off unless its variable names a file; the file is read on every call, so a test turns
the fault on and off while the daemon runs.

- ``BUILDQ_TEST_CLOCK_STEP_FILE``: ``time.time`` (and ``time.time_ns``) add the seconds the
  file holds, as a host's clock that NTP stepped would. Only Python's wall-clock readings move:
  ``time.monotonic`` does not (it does not on a real host either), nor C code reading the clock
  (SQLite's ``julianday('now')``, ``datetime.now``). Modules named in
  ``BUILDQ_TEST_CLOCK_STEP_EXEMPT`` (comma-separated) keep the real clock: the ``sim`` runner
  plays a CI service, which runs on a host of its own.
- ``BUILDQ_TEST_DISK_FULL_FILE``: while the file exists, every write statement the process
  sends fails as the database fails on a full disk: MariaDB error 1021 ("Disk full …"), SQLite
  "database or disk is full". Raised as the driver's own exception class from SQLAlchemy's
  ``before_cursor_execute``, inside the statement's error handling, so SQLAlchemy wraps it
  into ``sqlalchemy.exc.OperationalError`` exactly as it wraps a real one; reads still work, as
  they do on a full disk.

Python imports one ``sitecustomize`` module, the first on ``sys.path``: this one shadows the
system's while it is on PYTHONPATH (Debian's only sets up apport hooks).
"""

from __future__ import annotations

import os
import re
import sys
import time
from typing import Any

#: The variables that turn the faults on (tests.support.shims.env sets them).
CLOCK_STEP_FILE = "BUILDQ_TEST_CLOCK_STEP_FILE"
CLOCK_STEP_EXEMPT = "BUILDQ_TEST_CLOCK_STEP_EXEMPT"
DISK_FULL_FILE = "BUILDQ_TEST_DISK_FULL_FILE"
#: Statements that write (a locking read is not one: it works on a full disk).
_WRITE = re.compile(r"\s*(INSERT|UPDATE|DELETE|REPLACE)\b", re.IGNORECASE)
MYSQL_DISK_FULL = (
    "Disk full (/var/lib/mysql/#sql-temptable.MAI); waiting for someone to free some "
    'space... (errno: 28 "No space left on device")'
)


def _install_clock_step(step_file: str, exempt: frozenset[str]) -> None:
    real_time, real_time_ns = time.time, time.time_ns

    def step_s() -> float:
        if exempt and sys._getframe(2).f_globals.get("__name__") in exempt:
            return 0.0
        try:
            with open(step_file) as f:
                return float(f.read() or 0)
        except (OSError, ValueError):  # no file (yet), or half-written: no step
            return 0.0

    def stepped() -> float:
        return real_time() + step_s()

    def stepped_ns() -> int:
        return real_time_ns() + int(step_s() * 1e9)

    time.time = stepped
    time.time_ns = stepped_ns


def _install_disk_full(flag_file: str) -> None:
    import sqlite3

    import pymysql
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    def refuse_writes(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not _WRITE.match(statement) or not os.path.exists(flag_file):
            return
        if conn.dialect.name == "sqlite":
            raise sqlite3.OperationalError("database or disk is full")
        raise pymysql.err.OperationalError(1021, MYSQL_DISK_FULL)

    event.listen(Engine, "before_cursor_execute", refuse_writes)


def _install() -> None:
    if os.environ.get(CLOCK_STEP_FILE):
        exempt = os.environ.get(CLOCK_STEP_EXEMPT, "").split(",")
        _install_clock_step(os.environ[CLOCK_STEP_FILE], frozenset(filter(None, exempt)))
    if os.environ.get(DISK_FULL_FILE):
        _install_disk_full(os.environ[DISK_FULL_FILE])


# Only as the interpreter's own sitecustomize: tests import this module (as
# tests.support.shims.sitecustomize) for the names above, and must not be faulted themselves.
if __name__ == "sitecustomize":
    _install()
