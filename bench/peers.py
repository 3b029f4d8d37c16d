"""Peers — the workload the task queues we compare with were measured on, at daemon level.

``builds`` builds × ``polls`` polls of a self-rescheduling job: ``buildq run`` (one daemon
process, ``bench.daemon``) with the ``sim`` runner scripted by poll count (RUNNING for
``polls`` − 1 status calls, then SUCCEEDED), the poll interval fixed at ``delay_ms`` (no growth,
no jitter; 0 means the next poll is due at once). Every build is requested at once; a *cycle*
is one poll, and cycles/s is ``builds × polls`` over the time from the first request to the
last result (the daemon's trigger and result steps are inside that time, not counted as
cycles). ``cpu_ms_per_poll`` is the daemon's CPU time over the same span divided by the polls.

Durable commits on both backends: MariaDB as configured (``innodb_flush_log_at_trx_commit =
1``), SQLite in WAL mode with ``synchronous=NORMAL``, as buildq runs them. The peers' own
figures (dramatiq and celery on Redis, procrastinate on PostgreSQL, rq) were measured on this
machine with the same workload and are in docs/BENCHMARKS.md; ``ratio`` is the slower of the
two delays' cycles/s over the best peer figure recorded there (dramatiq on Redis without fsync,
delay 0: 2,605 cycles/s).
"""

from __future__ import annotations

import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Select, func, select

from bench.daemon import DaemonProcess, queries, round_trips, write_config
from bench.databases import Backend
from bench.e2e import requests
from bench.profiles import Profile
from bench.report import Result, log
from bench.timing import wait_for
from buildq.orchestrator import topics
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.schema import messages as m

#: dramatiq (Redis, no fsync) at delay 0, the fastest peer measured (docs/BENCHMARKS.md).
BEST_PEER_CYCLES_PER_S = 2_605
POLLS = 5
DELAYS_MS = (0, 200)
_RUNS = itertools.count()

CONFIG = """
[runners.sim]
type = "sim"
accepted_s = 0.0
running_s = 0.0
failure_probability = 0.0
polls = {polls}

[poll]
accepted_interval_s = {delay_s}
running_interval_s = {delay_s}
growth = 1.0
jitter = 0.0

[queues.bench]
runner = "sim"
"""


def _results(prefix: str) -> Select[Any]:
    return select(func.count()).where(
        m.c.topic == topics.BUILDRESULT, m.c.partition_key.like(f"{prefix}-%")
    )


def measure(backend: Backend, builds: int, delay_ms: int, tag: str = "peers") -> dict[str, float]:
    """One daemon, ``builds`` requests at once; cycles/s, CPU per poll and queries per poll.
    ``tag`` keeps the request ids of measurements in one database apart."""
    with tempfile.TemporaryDirectory(prefix="buildq-bench-peers-") as tmp:
        directory = Path(tmp)
        # 0 is "due at once": the next poll's delay is the loop's minimum, 1 ms.
        body = CONFIG.format(polls=POLLS, delay_s=max(delay_ms, 1) / 1000)
        config = write_config(directory, backend.url, body)
        db = backend.database(pool_size=4)
        queue = SqlQueue(db)
        daemon = DaemonProcess(config, directory).start()
        try:
            prefix = f"{tag}{delay_ms}-{next(_RUNS)}"
            batch = requests(builds, prefix)
            results = _results(prefix)
            before = daemon.fresh_stats()
            started = time.monotonic()
            for start in range(0, builds, 500):
                queue.publish_many(topics.BUILD, batch[start : start + 500])
            done = wait_for(
                lambda: db.read(lambda conn: conn.execute(results).scalar_one()) >= builds,
                timeout=600,
                interval=0.02,
            )
            elapsed = time.monotonic() - started
            after = daemon.fresh_stats()
        finally:
            daemon.stop()
            db.dispose()
    if not done:
        raise RuntimeError(f"peers: not every build finished:\n{daemon.log_text()}")
    polls = builds * POLLS
    figures = {
        "cycles_per_s": polls / elapsed,
        "cpu_ms_per_poll": (after["cpu_s"] - before["cpu_s"]) * 1000 / polls,
        "queries_per_poll": round_trips(queries(before, after)) / polls,
        "rss_mb": after.get("rss_kb", 0) / 1024,
    }
    log(f"peers {backend.name} delay={delay_ms}ms: {figures}")
    return figures


def run(backend: Backend, profile: Profile) -> Result:
    metrics: dict[str, float] = {}
    for delay_ms in DELAYS_MS:
        figures = measure(backend, profile.peers_builds, delay_ms)
        metrics[f"cycles_per_s@{delay_ms}"] = figures["cycles_per_s"]
        metrics[f"cpu_ms_per_poll@{delay_ms}"] = figures["cpu_ms_per_poll"]
        metrics[f"queries_per_poll@{delay_ms}"] = figures["queries_per_poll"]
        metrics[f"rss_mb@{delay_ms}"] = figures["rss_mb"]
    slowest = min(metrics[f"cycles_per_s@{d}"] for d in DELAYS_MS)
    metrics["cpu_ms_per_poll"] = max(metrics[f"cpu_ms_per_poll@{d}"] for d in DELAYS_MS)
    target = 2_800 if backend.name == "mysql" else 5_000
    return Result(
        bench="peers",
        backend=backend.name,
        metrics=metrics,
        ceiling={"best_peer": BEST_PEER_CYCLES_PER_S},
        ratio=slowest / BEST_PEER_CYCLES_PER_S,
        ratio_means="the slower delay's cycles/s / dramatiq on Redis (no fsync) at delay 0",
        target=f">= {target} cycles/s at both delays",
        met=slowest >= target,
    )
