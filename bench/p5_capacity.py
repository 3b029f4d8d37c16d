"""P5 — capacity: how many concurrent ``sim`` builds daemons keep at a 10 s poll cadence.

The daemons are real processes (``bench.daemon``: ``buildq run`` with counters), default
consumer settings, the ``sim`` runner with builds that never finish, and a poll
policy of exactly "every 10 s ± 10 %", no deadlines. Builds are seeded as the build controller
leaves them (stored, first poll pending). Each poll is the daemon's full cycle: read the build,
ask the runner, record the poll and publish the next one + ack in one transaction.

- **Saturation**: 10,000 builds polled every second, far more polls than the daemons make;
  their sustained polls/s over the window is the most they can do. Capacity at a 10 s cadence
  is that rate × 10 s (a daemon at capacity has no slack: in practice stay below it).
- **Verification** (full profile): N builds at the real cadence for a while, first polls spread
  over the first 10 s; the daemon keeps up when the lag (now − the oldest due, unclaimed poll)
  stays under ``MAX_LAG_MS`` over the second half and the poll rate is ≥ 90 % of N / 10 s.

Every run has a database of its own. RSS is each daemon's resident set at the end of the
window (VmRSS) and its peak (VmHWM); ``cpu_ms_per_poll`` is the daemons' CPU time (user +
system) per poll, the figure that decides capacity on a CPU-bound host and that noise barely
moves. Next to it, ceiling (b) at the daemon's 8 connections (measured before and after, the
mean): polls/s ÷ (b) says how much of the database's commit rate one daemon turns into polls.
"""

from __future__ import annotations

import itertools
import tempfile
import threading
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.ceiling import Ceiling
from bench.daemon import (
    DaemonProcess,
    latency_ms,
    processed,
    queries,
    round_trips,
    write_config,
)
from bench.databases import Backend, fresh_database
from bench.profiles import Profile
from bench.profiling import recording
from bench.report import Result, log
from bench.timing import percentile
from bench.workload import FOREVER_RUNNER, poll_every, seed_builds
from buildq.orchestrator import topics
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.schema import deliveries as d
from buildq.storage.database import Database
from buildq.storage.dialect import db_now_ms

CADENCE_S = 10.0
#: Saturation: this many builds, each due every second, is more polls than any daemon here
#: makes (a demand of 10,000/s).
SATURATION_BUILDS = 10_000
SATURATION_CADENCE_S = 1.0
MAX_LAG_MS = 2_000
#: Connections of the ceiling (b) these figures are divided by.
CEILING_CONNECTIONS = 8
_RUNS = itertools.count()
#: Age of the oldest poll that is due and not claimed (0 when none is): the daemons' lag.
OLDEST_DUE_AGE_MS = (
    select(db_now_ms() - d.c.visible_at)
    .where(d.c.grp == topics.GROUP, d.c.topic == topics.BUILDSIGNAL, d.c.visible_at <= db_now_ms())
    .order_by(d.c.visible_at)
    .limit(1)
)


class _LagSampler:
    """Samples the age of the oldest due, unclaimed poll once a second."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> _LagSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.samples.append((time.monotonic(), self._lag_ms()))

    def _lag_ms(self) -> float:
        age = self.db.read(lambda conn: conn.execute(OLDEST_DUE_AGE_MS).scalar())
        return 0.0 if age is None else float(age)


def _run_daemons(
    backend_name: str,
    daemons: int,
    builds: int,
    first_poll_ms: tuple[int, int],
    seconds: float,
    warmup_s: float,
    pyspy: str | None = None,
    cadence_s: float = CADENCE_S,
) -> dict[str, Any]:
    """In a database of its own: seed, start ``daemons``, measure polls/s, lag and RSS over
    ``seconds`` after warm-up, builds polled every ``cadence_s``."""
    tag = f"p5run{next(_RUNS)}"
    with (
        fresh_database(backend_name, tag) as backend,
        tempfile.TemporaryDirectory(prefix="buildq-bench-p5-") as tmp,
    ):
        directory = Path(tmp)
        config = write_config(directory, backend.url, FOREVER_RUNNER + poll_every(cadence_s))
        db = backend.database(pool_size=4)
        queue = SqlQueue(db)
        seed_builds(db, queue, builds, first_poll_ms=first_poll_ms, prefix=f"b{builds}")
        procs = [DaemonProcess(config, directory, i) for i in range(daemons)]
        sampler = _LagSampler(db)
        try:
            for proc in procs:
                proc.start()
            sampler.start()
            time.sleep(warmup_s)
            before = [p.fresh_stats() for p in procs]
            started = time.monotonic()
            spying: AbstractContextManager[dict[str, Any]] = (
                recording(procs[0].pid, seconds, pyspy) if pyspy else nullcontext({})
            )
            with spying as profiled:
                time.sleep(seconds)
            after = [p.fresh_stats() for p in procs]
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
            for proc in procs:
                proc.stop()
            db.dispose()
    polls = sum(
        processed(a, topics.BUILDSIGNAL) - processed(b, topics.BUILDSIGNAL)
        for a, b in zip(after, before, strict=True)
    )
    by_verb: dict[str, int] = {}
    for a, b in zip(after, before, strict=True):
        for verb, n in queries(b, a).items():
            by_verb[verb] = by_verb.get(verb, 0) + n
    trips = round_trips(by_verb)
    late = [lag for t, lag in sampler.samples if t >= started + seconds / 2]
    return {
        "polls_per_s": polls / elapsed,
        "queries_per_poll": trips / max(1, polls),
        "cpu_ms_per_poll": 1000
        * sum(a["cpu_s"] - b["cpu_s"] for a, b in zip(after, before, strict=True))
        / max(1, polls),
        "sys_ms_per_poll": 1000
        * sum(a["cpu_sys_s"] - b["cpu_sys_s"] for a, b in zip(after, before, strict=True))
        / max(1, polls),
        "per_poll": {k: round(v / max(1, polls), 2) for k, v in sorted(by_verb.items())},
        "latency_ms": latency_ms(before[0], after[0]),
        "lag_max_ms": max(late, default=0.0),
        "lag_p50_ms": percentile(late, 50) if late else 0.0,
        "rss_mb": max(a.get("rss_kb", 0) for a in after) / 1024,
        "hwm_mb": max(a.get("hwm_kb", 0) for a in after) / 1024,
        "py-spy": profiled,
    }


def saturate(
    backend_name: str, daemons: int, seconds: float, pyspy: str | None = None
) -> dict[str, Any]:
    """The most polls/s ``daemons`` sustain: builds polled every second, many more than they
    can poll, so work is always due (a backlog drained once would measure the backlog)."""
    return _run_daemons(
        backend_name,
        daemons,
        SATURATION_BUILDS,
        (0, 1_000),
        seconds,
        warmup_s=3.0,
        pyspy=pyspy,
        cadence_s=SATURATION_CADENCE_S,
    )


def verify(backend_name: str, daemons: int, builds: int, seconds: float) -> dict[str, Any]:
    """Does ``daemons`` keep ``builds`` at the 10 s cadence?"""
    figures = _run_daemons(
        backend_name, daemons, builds, (0, int(CADENCE_S * 1000)), seconds, warmup_s=CADENCE_S
    )
    expected = builds / CADENCE_S
    figures["keeps_up"] = (
        figures["lag_max_ms"] <= MAX_LAG_MS and figures["polls_per_s"] >= 0.9 * expected
    )
    return figures


def run(backend: Backend, profile: Profile) -> Result:
    ceiling = Ceiling(backend, profile.ceiling_s)
    before = ceiling.txn(CEILING_CONNECTIONS)  # and again after: the mean of the two is the ceiling
    metrics: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for daemons in profile.p5_daemons:
        spy = f"p5-{backend.name}-d{daemons}" if profile.pyspy else None
        figures = saturate(backend.name, daemons, profile.p5_saturate_s, spy)
        log(f"p5 {backend.name} saturation, {daemons} daemon(s): {figures}")
        metrics[f"capacity_d{daemons}"] = int(figures["polls_per_s"] * CADENCE_S)
        metrics[f"polls_per_s_d{daemons}"] = figures["polls_per_s"]
        metrics[f"rss_mb_d{daemons}"] = figures["rss_mb"]
        metrics[f"cpu_ms_per_poll_d{daemons}"] = figures["cpu_ms_per_poll"]
        notes[f"saturate_d{daemons}"] = figures
    capacity = metrics["capacity_d1"]
    if profile.p5_verify_s:
        levels = sorted({int(capacity * 0.8 / 100) * 100, *profile.p5_levels})
        for level in levels:
            figures = verify(backend.name, 1, level, profile.p5_verify_s)
            log(f"p5 {backend.name} verify {level} builds, 1 daemon: {figures}")
            metrics[f"keeps_{level}"] = int(figures["keeps_up"])
            notes[f"verify_{level}"] = figures
    ceil = {f"b_c{CEILING_CONNECTIONS}": (before + ceiling.txn(CEILING_CONNECTIONS)) / 2}
    ratio = metrics["polls_per_s_d1"] / ceil[f"b_c{CEILING_CONNECTIONS}"]
    return Result(
        bench="p5",
        backend=backend.name,
        metrics=metrics,
        ceiling=ceil,
        ratio=ratio,
        ratio_means=f"one daemon's polls/s at saturation / (b) at {CEILING_CONNECTIONS} connections",
        target=">= 10,000 builds at 10 s (1 daemon, MariaDB) with RSS <= 150 MB",
        met=capacity >= 10_000 and metrics["rss_mb_d1"] <= 150,
        notes=notes,
    )
