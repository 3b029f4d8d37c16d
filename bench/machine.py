"""What the figures were measured on (the run's record), and a process's memory."""

from __future__ import annotations

import contextlib
import os
import platform
import sqlite3
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import ROOT
from bench.databases import mysql_server_url


def machine_info(backends: Sequence[str]) -> dict[str, Any]:
    """What the figures were measured on: enough to tell two runs' machines apart."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_mb": _mem_mb(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlalchemy": sa.__version__,
        "sqlite": sqlite3.sqlite_version,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "git": _git_revision(),
    }
    if "mysql" in backends:
        info["mysql"] = _mysql_settings()
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _mem_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def _git_revision() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "buildq"], cwd=ROOT, capture_output=True
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _mysql_settings() -> dict[str, Any]:
    import pymysql

    names = (
        "version",
        "innodb_flush_log_at_trx_commit",
        "innodb_buffer_pool_size",
        "log_bin",
        "sync_binlog",
        "innodb_flush_method",
    )
    engine = sa.create_engine(mysql_server_url())
    try:
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SHOW VARIABLES").all()
        found = {str(k): str(v) for k, v in rows if k in names}
    finally:
        engine.dispose()
    found["pymysql"] = pymysql.__version__
    return found


def rss_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB, from /proc."""
    values = {"VmRSS": 0, "VmHWM": 0}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in values:
                values[key] = int(line.split()[1])
    return values["VmRSS"], values["VmHWM"]
