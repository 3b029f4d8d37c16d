"""P3 — idle cost: queries/s of an idle daemon with 100 and with 10,000 waiting builds.

One daemon process (``bench.daemon``: ``buildq run`` with SQL counters) with its default
consumer settings (poll interval 200 ms, lease renewal every 3 s, 4 subscriptions) and its
HTTP endpoint on (whose metrics refresher reads queue and build gauges every 10 s). First 100
builds wait for a poll due in an hour; the daemon's queries are counted over a window; then
9,900 more builds are added and the same window is counted again, in the same process. The
count is every statement, COMMIT, ROLLBACK and pool connect/reset the process sent (SQLAlchemy
events): the per-process equivalent of the server's ``Questions``. On MariaDB the server's
global ``Questions`` delta is recorded beside it, as an upper bound: it includes every other
client of the shared server. Beside the count, ``sql_ms_per_s``: milliseconds per second the
daemon waited on SQL (driver call to result), which shows a query whose *work* grows with the
number of builds even when the number of queries does not.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench.daemon import DaemonProcess, latency_ms, queries, round_trips, write_config
from bench.databases import Backend
from bench.profiles import Profile
from bench.report import Result, log
from bench.workload import FOREVER_RUNNER, poll_every, seed_builds
from buildq.queue.sql import SqlQueue

HOUR_MS = 3_600_000
SETTLE_S = 1.0


def _server_questions(db_url: str) -> int | None:
    if not db_url.startswith("mysql"):
        return None
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            row = conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Questions'").one()
        return int(row[1])
    finally:
        engine.dispose()


def _window(daemon: DaemonProcess, url: str, seconds: float) -> dict[str, Any]:
    """What the daemon sent over ``seconds``: queries/s, by kind, and ms of SQL per second."""
    before, server_before = daemon.fresh_stats(), _server_questions(url)
    time.sleep(seconds)
    after, server_after = daemon.fresh_stats(), _server_questions(url)
    elapsed = after["t"] - before["t"]
    by_kind = queries(before, after)
    spent = queries(before, after, "sql_ms")
    server = (
        (server_after - server_before) / elapsed
        if server_before is not None and server_after is not None
        else float("nan")
    )
    return {
        "qps": round_trips(by_kind) / elapsed,
        "sql_ms_per_s": sum(spent.values()) / elapsed,
        "by_kind": by_kind,
        "ms_by_kind": spent,
        "latency_ms": latency_ms(before, after),
        "server_questions_per_s_all_clients": server,
    }


def run(backend: Backend, profile: Profile) -> Result:
    few, many = profile.p3_builds
    with tempfile.TemporaryDirectory(prefix="buildq-bench-p3-") as tmp:
        directory = Path(tmp)
        config = write_config(directory, backend.url, FOREVER_RUNNER + poll_every(3600))
        db = backend.database(pool_size=4)
        queue = SqlQueue(db)
        daemon = DaemonProcess(config, directory).start()
        try:
            seed_builds(db, queue, few, first_poll_ms=(HOUR_MS, HOUR_MS), prefix="few")
            time.sleep(SETTLE_S)
            at_few = _window(daemon, backend.url, profile.p3_window_s)
            log(f"p3 {backend.name} {few} builds: {at_few}")
            seed_builds(db, queue, many - few, first_poll_ms=(HOUR_MS, HOUR_MS), prefix="many")
            time.sleep(SETTLE_S)
            at_many = _window(daemon, backend.url, profile.p3_window_s)
            log(f"p3 {backend.name} {many} builds: {at_many}")
            rss = daemon.stats().get("rss_kb", 0) / 1024
        finally:
            daemon.stop()
            db.dispose()
    rate_few, rate_many = at_few["qps"], at_many["qps"]
    ratio = rate_many / rate_few if rate_few else float("nan")
    return Result(
        bench="p3",
        backend=backend.name,
        metrics={
            f"qps_{few}": rate_few,
            f"qps_{many}": rate_many,
            f"sql_ms_per_s_{few}": at_few["sql_ms_per_s"],
            f"sql_ms_per_s_{many}": at_many["sql_ms_per_s"],
            "rss_mb": rss,
        },
        ceiling={},
        ratio=ratio,
        ratio_means=f"queries/s with {many} waiting builds / with {few}",
        target="ratio <= 1.5",
        met=ratio <= 1.5,
        notes={f"at_{few}": at_few, f"at_{many}": at_many},
    )
