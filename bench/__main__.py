"""``python -m bench``: run the benchmarks, print one BENCH line each and one summary line.

    python -m bench --profile quick            # make bench: both backends, under 5 minutes
    python -m bench --profile full             # make bench-full
    python -m bench --only p1,p5 --backend mysql --py-spy

MariaDB/MySQL comes from ``BUILDQ_BENCH_MYSQL_URL`` (else ``BUILDQ_TEST_MYSQL_URL``, else
root@127.0.0.1:3306); each benchmark gets a database of its own (``buildq_bench_<pid>_<name>``)
that is dropped afterwards. Without a server the MariaDB half is skipped, saying why.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Callable

from bench import (
    ceiling,
    drivers,
    e2e,
    p1_cycle,
    p2_publish,
    p3_idle,
    p4_delay,
    p5_capacity,
    peers,
)
from bench.databases import (
    BACKENDS,
    Backend,
    drop_stale_databases,
    fresh_database,
    mysql_available,
    server_lost,
)
from bench.machine import machine_info
from bench.profiles import PROFILES, Profile
from bench.report import Recorder, Result, log
from bench.timing import wait_for

BENCHES: dict[str, Callable[[Backend, Profile], Result]] = {
    "ceiling": lambda backend, profile: ceiling.run(backend, profile.ceiling_s, (1, 4, 16)),
    "p1": p1_cycle.run,
    "p2": p2_publish.run,
    "p3": p3_idle.run,
    "p4": p4_delay.run,
    "p5": p5_capacity.run,
    "e2e": e2e.run,
    "peers": peers.run,
    "drivers": drivers.run,
}
#: Results whose headline ratio is a share of the ceiling: the summary's ratio is their mean.
TO_CEILING = ("p1", "p2", "p5", "e2e")
ATTEMPTS = 3


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    profile = dataclasses.replace(PROFILES[args.profile], pyspy=args.py_spy)
    only = args.only.split(",") if args.only else list(profile.benches)
    unknown = set(only) - set(BENCHES)
    if unknown:
        print(f"bench: unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHES)}")
        return 2
    backends = list(BACKENDS) if args.backend == "all" else [args.backend]
    if "mysql" in backends and (why := mysql_available()) is not None:
        log(f"MariaDB/MySQL unavailable, skipping its half: {why}")
        backends.remove("mysql")

    from buildq import logs

    logs.configure("warning", "json")
    run_id = time.strftime("%Y%m%dT%H%M%S")
    recorder = Recorder(
        {
            "run_id": run_id,
            "profile": profile.name,
            "pyspy": profile.pyspy,
            "benches": only,
            "backends": backends,
            "machine": machine_info(backends),
        }
    )
    started = time.monotonic()
    failures = []
    if "mysql" in backends:
        drop_stale_databases()
    for backend_name in backends:
        for name in only:
            if not _run_one(recorder, name, backend_name, profile):
                failures.append(f"{name}.{backend_name}")
    print(_summary(recorder.results, profile, time.monotonic() - started, failures), flush=True)
    return 1 if failures else 0


def _run_one(recorder: Recorder, name: str, backend_name: str, profile: Profile) -> bool:
    """Run one benchmark; if the database server went away (the machine is shared: someone's
    tests may restart it), wait for it and run the benchmark again, up to ``ATTEMPTS``."""
    for attempt in range(1, ATTEMPTS + 1):
        log(f"{name} on {backend_name} ({profile.name})")
        try:
            with fresh_database(backend_name, name) as backend:
                recorder.record(BENCHES[name](backend, profile))
            return True
        except Exception as err:  # report and go on: one broken bench must not hide the rest
            log(f"{name} on {backend_name} failed: {type(err).__name__}: {err}")
            if backend_name != "mysql" or not server_lost(err) or attempt == ATTEMPTS:
                return False
            log("the database server went away; waiting for it to run this benchmark again")
            if not wait_for(lambda: mysql_available() is None, timeout=180, interval=2):
                return False
    return False


def _summary(results: list[Result], profile: Profile, elapsed: float, failures: list[str]) -> str:
    """``BENCH summary …``: every headline ratio, targets met, and the geometric mean of the
    to-ceiling ratios as the overall ``ratio``."""
    parts = [f"profile={profile.name}", f"seconds={elapsed:.0f}"]
    parts += [f"{r.name}={r.ratio:.3g}" for r in results]
    judged = [r for r in results if r.met is not None]
    parts.append(f"targets_met={sum(1 for r in judged if r.met)}/{len(judged)}")
    if failures:
        parts.append(f"failed={','.join(failures)}")
    shares = [r.ratio for r in results if r.bench in TO_CEILING and r.ratio > 0]
    overall = math.exp(sum(math.log(x) for x in shares) / len(shares)) if shares else math.nan
    return f"BENCH summary {' '.join(parts)} ratio={overall:.3g}"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    parser.add_argument("--backend", choices=[*BACKENDS, "all"], default="all")
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(BENCHES)}")
    parser.add_argument(
        "--py-spy",
        action="store_true",
        help="profile P1 and P5 with py-spy (slower; its figures are not for the tables)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
