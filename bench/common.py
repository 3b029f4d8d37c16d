"""What every benchmark shares: profiles, backends and fresh databases, timing, results.

Every figure is reported next to a ceiling measured in the same run (the machine is shared and
noisy, so absolute numbers from different runs do not compare; ratios do). A result is one JSON
line appended to ``bench/results/results.jsonl`` and one summary line on stdout::

    BENCH <name> <metric>=<value> … ratio=<r>
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from buildq.migrations import upgrade
from buildq.storage.database import Database, create_engine

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_FILE = RESULTS_DIR / "results.jsonl"
DEFAULT_MYSQL_URL = "mysql+pymysql://root@127.0.0.1:3306/test"
BACKENDS = ("mysql", "sqlite")


@dataclass(frozen=True)
class Profile:
    """How long and how wide each benchmark runs. ``quick`` fits in 5 minutes for both backends."""

    name: str
    benches: tuple[str, ...]  # what ``python -m bench`` runs without --only
    rounds: int  # P1/P2 alternate ceiling and figure this many times (noise hits both alike)
    ceiling_s: float  # per ceiling measurement (one statement shape, one connection count)
    p1_s: float  # per (mode, threads) measurement
    p1_threads: tuple[int, ...]
    p1_builds: int  # partitions (builds) cycling through the topic
    p2_s: float
    p2_threads: tuple[int, ...]
    p2_batch: int
    p3_window_s: float
    p3_builds: tuple[int, int]
    p4_s: float
    p4_rates: tuple[int, ...]  # the first is the target rate; the others show the precision
    p5_saturate_s: float
    p5_verify_s: float
    p5_daemons: tuple[int, ...]
    p5_levels: tuple[int, ...]  # extra fixed levels checked at the real cadence (full only)
    e2e_requests: int
    peers_builds: int  # builds of the peers' workload (each polled 5 times)
    pyspy: bool = False  # record py-spy profiles of P1 and P5 (see bench/profiling.py)


PROFILES = {
    "quick": Profile(
        name="quick",
        # The stand-alone ceiling table is left out: every benchmark measures its own.
        benches=("p1", "p2", "p3", "p4", "p5", "e2e", "peers"),
        rounds=2,
        ceiling_s=1.0,
        p1_s=1.2,
        p1_threads=(1, 4, 16),
        p1_builds=3_000,
        p2_s=1.0,
        p2_threads=(1,),
        p2_batch=100,
        p3_window_s=10.0,  # the metrics refresher runs every 10 s: one run per window
        p3_builds=(100, 10_000),
        p4_s=6.0,
        p4_rates=(1_000, 200),
        p5_saturate_s=8.0,
        p5_verify_s=0.0,
        p5_daemons=(1, 3),
        p5_levels=(),
        e2e_requests=500,
        peers_builds=1_000,
    ),
    "full": Profile(
        name="full",
        benches=("ceiling", "p1", "p2", "p3", "p4", "p5", "e2e", "peers"),
        rounds=3,
        ceiling_s=3.0,
        p1_s=4.0,
        p1_threads=(1, 4, 16),
        p1_builds=5_000,
        p2_s=3.0,
        p2_threads=(1, 4),
        p2_batch=100,
        p3_window_s=30.0,
        p3_builds=(100, 10_000),
        p4_s=30.0,
        p4_rates=(1_000, 500, 200),
        p5_saturate_s=15.0,
        p5_verify_s=40.0,
        p5_daemons=(1, 2, 3),
        p5_levels=(10_000,),
        e2e_requests=3_000,
        peers_builds=1_000,
    ),
}


# --- backends and databases ----------------------------------------------------------------


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


# --- timing ----------------------------------------------------------------------------------


class Counter:
    """A thread-safe counter that can be read at the edges of a measurement window."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.value += n


def run_threads(
    threads: int,
    seconds: float,
    op: Callable[[int], int],
    *,
    setup: Callable[[int], Any] | None = None,
    warmup_s: float = 0.3,
) -> float:
    """Run ``op(index)`` in ``threads`` threads for ``seconds``; operations per second.

    ``op`` returns how many operations it did. Each thread runs ``setup(index)`` first (open
    its connection); only operations finished inside the window after ``warmup_s`` count.
    """
    counter = Counter()
    start = threading.Barrier(threads + 1)
    window: dict[str, float] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop(index: int) -> None:
        try:
            if setup is not None:
                setup(index)
            start.wait()
            while not stop.is_set():
                done = op(index)
                if "from" in window and "to" not in window:
                    counter.add(done)
        except BaseException as err:
            errors.append(err)
            stop.set()
            with contextlib.suppress(threading.BrokenBarrierError):
                start.abort()

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for worker in workers:
        worker.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start.wait()
    time.sleep(warmup_s)
    before = counter.value
    window["from"] = time.monotonic()
    time.sleep(seconds)
    window["to"] = time.monotonic()
    after = counter.value
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    if errors:
        raise errors[0]
    return (after - before) / (window["to"] - window["from"])


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return float(ordered[rank])


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# --- results ---------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.0f}"
    return str(value)


@dataclass
class Result:
    """One benchmark on one backend: its figures, the ceiling beside them, one headline ratio."""

    bench: str
    backend: str
    metrics: dict[str, Any]
    ceiling: dict[str, Any]
    ratio: float
    ratio_means: str  # what the headline ratio divides by what
    target: str = ""
    met: bool | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.bench}.{self.backend}"

    def line(self) -> str:
        figures = {**self.metrics, **{f"ceil_{k}": v for k, v in self.ceiling.items()}}
        parts = [f"{key}={_fmt(value)}" for key, value in figures.items()]
        return f"BENCH {self.name} {' '.join(parts)} ratio={_fmt(self.ratio)}"


class Recorder:
    """Prints each result's BENCH line and appends it as a JSON line, tagged with the run."""

    def __init__(self, run: Mapping[str, Any], path: Path = RESULTS_FILE) -> None:
        self.run = dict(run)
        self.path = path
        self.results: list[Result] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        self._append({"kind": "run", **self.run})

    def record(self, result: Result) -> None:
        self.results.append(result)
        self._append(
            {
                "kind": "result",
                "run_id": self.run["run_id"],
                "profile": self.run["profile"],
                "name": result.name,
                "bench": result.bench,
                "backend": result.backend,
                "metrics": result.metrics,
                "ceiling": result.ceiling,
                "ratio": result.ratio,
                "ratio_means": result.ratio_means,
                "target": result.target,
                "met": result.met,
                "notes": result.notes,
            }
        )
        print(result.line(), flush=True)

    def _append(self, record: Mapping[str, Any]) -> None:
        with self.path.open("a") as out:
            out.write(json.dumps(record, sort_keys=True, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


def log(message: str) -> None:
    """Progress on stderr, so stdout holds only BENCH lines."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the machine -----------------------------------------------------------------------------


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
