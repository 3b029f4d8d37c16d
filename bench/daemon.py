"""The daemon as a measured process: ``buildq run`` plus counters, for P3, P5 and end to end.

    python -m bench.daemon CONFIG STATS.json

runs exactly what ``buildq run --config CONFIG`` runs (``Daemon(config).run()`` semantics:
SIGTERM drains and exits) and, twice a second, writes STATS.json: the SQL the process sent
(statements by first word, commits, rollbacks, pool connects and resets — SQLAlchemy events on
every engine, so it counts this process only, unlike the server's global ``Questions``), the
deliveries it processed by topic and outcome, and its RSS. ``DaemonProcess`` starts one from a
benchmark and reads those stats.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.machine import rss_kb
from bench.timing import wait_for

STATS_INTERVAL_S = 0.5


# --- the parent side -------------------------------------------------------------------------


def write_config(directory: Path, url: str, body: str) -> Path:
    """A daemon config: the database, quiet logs, defaults otherwise; ``body`` holds runners
    and queues."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "buildq.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n\n'
        '[daemon]\nshutdown_grace_s = 5\nlog_level = "warning"\nlog_format = "json"\n\n'
        # HTTP on, as shipped: its metrics refresher queries the database too (port 0: any).
        '[http]\nenabled = true\nbind = "127.0.0.1"\nport = 0\n\n' + textwrap.dedent(body)
    )
    path.chmod(0o600)
    return path


class DaemonProcess:
    """One ``python -m bench.daemon`` child: start, read its stats, stop."""

    def __init__(self, config: Path, directory: Path, index: int = 0) -> None:
        self.config = config
        self.stats_path = directory / f"stats-{index}.json"
        self.log_path = directory / f"daemon-{index}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> DaemonProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.daemon", str(self.config), str(self.stats_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parent.parent,
        )
        log.close()
        ready = wait_for(
            lambda: (
                self.process is not None
                and (self.process.poll() is not None or self.stats().get("ready"))
            ),
            timeout,
        )
        if not ready or self.process.poll() is not None:
            raise RuntimeError(f"daemon did not start: {self.log_text()}")
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stats(self) -> dict[str, Any]:
        try:
            return dict(json.loads(self.stats_path.read_text()))
        except (OSError, ValueError):
            return {}

    def fresh_stats(self) -> dict[str, Any]:
        """Stats written after this call (waits up to two intervals)."""
        now = time.time()
        stats = wait_for(lambda: (s := self.stats()).get("t", 0) > now and s, 5, 0.05)
        return stats or self.stats()

    def stop(self, timeout: float = 30) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(timeout=10)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def queries(before: dict[str, Any], after: dict[str, Any], field: str = "sql") -> dict[str, Any]:
    """What a daemon sent between two stats, by ``statement_key`` (plus COMMIT, ROLLBACK,
    CONNECT, RESET); ``field="sql_ms"``: the milliseconds spent in each."""
    out: dict[str, Any] = {}
    for key in set(before.get(field, {})) | set(after.get(field, {})):
        delta = after.get(field, {}).get(key, 0) - before.get(field, {}).get(key, 0)
        if delta:
            out[key] = round(delta, 1) if field == "sql_ms" else delta
    return out


def latency_ms(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Mean milliseconds per statement of each kind (round trip, server time and driver)."""
    counts, spent = queries(before, after), queries(before, after, "sql_ms")
    return {key: round(spent[key] / n, 2) for key, n in counts.items() if key in spent and n}


def round_trips(by_verb: dict[str, int]) -> int:
    """Queries the server answered: everything counted but pool resets, which cost no round
    trip (MySQL pools here do not reset; SQLite's reset is a local no-op outside a transaction)."""
    return sum(n for verb, n in by_verb.items() if verb != "RESET")


def processed(stats: dict[str, Any], topic: str, outcome: str = "ack") -> int:
    return int(stats.get("processed", {}).get(f"{topic}:{outcome}", 0))


# --- the child side ----------------------------------------------------------------------------


class _Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sql: Counter[str] = Counter()
        self.sql_ms: defaultdict[str, float] = defaultdict(float)
        self.processed: Counter[str] = Counter()

    def add_sql(self, key: str, ms: float | None = None) -> None:
        with self.lock:
            if ms is None:
                self.sql[key] += 1
            else:
                self.sql_ms[key] += ms

    def add_processed(self, key: str) -> None:
        with self.lock:
            self.processed[key] += 1

    def snapshot(self) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
        with self.lock:
            return dict(self.sql), dict(self.sql_ms), dict(self.processed)


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+`?(\w+)", re.IGNORECASE)


@functools.lru_cache(maxsize=4096)
def statement_key(statement: str) -> str:
    """``VERB table``: the first word and the first table named (``SELECT queue_deliveries``).
    Cached: the measured process sends the same few statement strings over and over."""
    verb = statement.lstrip().split(None, 1)[0].upper()
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1)}" if table else verb


def _install_sql_counters(counts: _Counts) -> None:
    """Count (and time) what the process sends: statements, COMMIT, ROLLBACK, connects."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from sqlalchemy.engine.default import DefaultDialect
    from sqlalchemy.pool import Pool

    def before(conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        key = statement_key(statement)
        counts.add_sql(key)
        conn.info.setdefault("bench_started", []).append((key, time.perf_counter()))

    def after(conn: Any, *_args: Any) -> None:
        key, started = conn.info["bench_started"].pop()
        counts.add_sql(key, (time.perf_counter() - started) * 1000)

    event.listen(Engine, "before_cursor_execute", before)
    event.listen(Engine, "after_cursor_execute", after)
    event.listen(Pool, "connect", lambda *_args: counts.add_sql("CONNECT"))
    event.listen(Pool, "reset", lambda *_args: counts.add_sql("RESET"))
    # Rollbacks through the engine only: a pool reset's rollback is no round trip (MySQL pools
    # here do not reset; sqlite3 skips it outside a transaction).
    event.listen(Engine, "rollback", lambda _conn: counts.add_sql("ROLLBACK"))
    original: Callable[[Any, Any], None] = DefaultDialect.do_commit

    def timed_commit(self: Any, dbapi_conn: Any) -> None:
        counts.add_sql("COMMIT")
        started = time.perf_counter()
        try:
            original(self, dbapi_conn)
        finally:
            counts.add_sql("COMMIT", (time.perf_counter() - started) * 1000)

    DefaultDialect.do_commit = timed_commit  # type: ignore[method-assign]


def _write_stats(path: Path, counts: _Counts, ready: threading.Event) -> None:
    while True:
        sql, sql_ms, done = counts.snapshot()
        rss, hwm = rss_kb(os.getpid())
        stats = {
            "t": time.time(),
            "pid": os.getpid(),
            "ready": ready.is_set(),
            "sql": sql,
            "sql_ms": sql_ms,
            "processed": done,
            "cpu_s": sum(os.times()[:2]),
            "cpu_sys_s": os.times()[1],
            "rss_kb": rss,
            "hwm_kb": hwm,
            "threads": threading.active_count(),
        }
        staging = path.with_suffix(".tmp")
        staging.write_text(json.dumps(stats))
        staging.replace(path)
        time.sleep(STATS_INTERVAL_S)


def main() -> int:
    config_path, stats_path = sys.argv[1], Path(sys.argv[2])
    from buildq import logs
    from buildq.config import load_config
    from buildq.orchestrator.daemon import Daemon

    counts = _Counts()
    _install_sql_counters(counts)
    config = load_config(config_path)
    logs.configure(config.daemon.log_level, config.daemon.log_format)

    def on_event(event: str, **data: Any) -> None:
        if event == "processed":
            counts.add_processed(f"{data.get('topic')}:{data.get('outcome')}")

    daemon = Daemon(config, on_event=on_event)
    ready = threading.Event()
    threading.Thread(
        target=_write_stats, args=(stats_path, counts, ready), name="bench-stats", daemon=True
    ).start()
    signal.signal(signal.SIGTERM, lambda *_: daemon.stopping.set())
    signal.signal(signal.SIGINT, lambda *_: daemon.stopping.set())
    daemon.start()
    ready.set()
    while not daemon.stopping.wait(0.5):
        pass
    daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
