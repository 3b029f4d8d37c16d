"""Drivers — PyMySQL (pure Python, the default) beside mysqlclient (``mysql+mysqldb://``, C).

The same daemon workload as ``peers`` (1,000 builds × 5 polls, delay 0: the daemon's
throughput) and the same engine cycle as P1 (``worker``), each run with one driver and then
the other, alternating for ``rounds`` rounds in one run so the machine's noise hits both alike.
MariaDB only (SQLite has one driver). Without mysqlclient installed (it needs the MariaDB
client headers to build: ``apt-get install libmariadb-dev pkg-config``, then
``pip install 'buildq[mysqlclient]'``) the benchmark says so and reports PyMySQL alone.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import sqlalchemy as sa

from bench import p1_cycle, peers
from bench.databases import Backend
from bench.profiles import Profile
from bench.report import Result, log

DRIVERS = {"pymysql": "mysql+pymysql", "mysqldb": "mysql+mysqldb"}


def _with_driver(backend: Backend, drivername: str) -> Backend:
    url = sa.make_url(backend.url).set(drivername=drivername).render_as_string(hide_password=False)
    return dataclasses.replace(backend, url=url)


def run(backend: Backend, profile: Profile) -> Result:
    if backend.name != "mysql":
        raise RuntimeError("drivers: MariaDB/MySQL only (SQLite has one driver)")
    drivers = dict(DRIVERS)
    if importlib.util.find_spec("MySQLdb") is None:
        log("drivers: mysqlclient is not installed; measuring PyMySQL alone")
        del drivers["mysqldb"]
    rates: dict[str, list[float]] = {}
    for _ in range(profile.rounds):
        for name, drivername in drivers.items():
            driven = _with_driver(backend, drivername)
            daemon = peers.measure(driven, profile.peers_builds, 0, tag=f"drv{name}")
            rates.setdefault(f"{name}_cycles_per_s", []).append(daemon["cycles_per_s"])
            rates.setdefault(f"{name}_cpu_ms_per_poll", []).append(daemon["cpu_ms_per_poll"])
            work = p1_cycle.Workload(driven, profile.p1_builds)
            try:
                cycle = p1_cycle.run_worker(work.queue, work.sub, work.cycle, profile.p1_s, None)
            finally:
                work.close()
            rates.setdefault(f"{name}_p1_worker", []).append(cycle["rate"])
            rates.setdefault(f"{name}_p1_cpu_ms", []).append(cycle["cpu_ms_per_cycle"])
            log(f"drivers {name}: daemon {daemon} p1 {cycle['rate']:.0f}/s")
    metrics = {key: sum(values) / len(values) for key, values in rates.items()}
    ratio = (
        metrics["mysqldb_cycles_per_s"] / metrics["pymysql_cycles_per_s"]
        if "mysqldb" in drivers
        else float("nan")
    )
    return Result(
        bench="drivers",
        backend=backend.name,
        metrics=metrics,
        ceiling={"pymysql_cycles_per_s": metrics["pymysql_cycles_per_s"]},
        ratio=ratio,
        ratio_means="mysqlclient's daemon cycles/s / PyMySQL's (peers' workload, delay 0)",
    )
