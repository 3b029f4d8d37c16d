"""The chaos run: three daemons on one MariaDB, faults while builds flow, invariants checked.

    python -m tests.system.chaos.run         # the bounded run (what test_chaos.py runs)
    python -m tests.system.chaos.run --full  # make chaos: 1,000 builds, a real MariaDB restart

The server comes from ``BUILDQ_TEST_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``);
the run creates its own database on it and drops it afterwards (``--keep`` keeps it, and the
work directory, for a post-mortem). The last line printed is the summary:
``CHAOS builds=… lost=0 duplicated=0 forked=0 …``; the exit code is 0 when every invariant held.
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from buildq.buildrunner import Change
from buildq.migrations import upgrade
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.queue.contract import Message, message_id
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database, create_engine
from tests.support.daemon import BUILDQ
from tests.support.database import private_database
from tests.support.waiting import wait_until
from tests.system.chaos import audit, causes
from tests.system.chaos.cluster import Node
from tests.system.chaos.faults import FaultLog, Injector, ProxyOutage, ServerRestart
from tests.system.chaos.profiles import (
    BOUNDED,
    CONFIG,
    FAULTED_QUEUE,
    FINISH_BY_S,
    FULL,
    QUEUES,
    START_BY_S,
    Profile,
)
from tests.system.chaos.readiness import Readiness
from tests.system.chaos.sampler import Sampler

DEFAULT_SERVER = "mysql+pymysql://root@127.0.0.1:3306/test"


@dataclass
class Run:
    profile: Profile
    server_url: str
    workdir: Path
    seed: int
    db_url: str = ""
    daemon_url: str = ""
    nodes: list[Node] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    cancels_sent: int = 0
    readiness: Readiness = field(default_factory=Readiness)


@contextmanager
def chaos_database(server_url: str, keep: bool = False) -> Iterator[str]:
    """A fresh, migrated database for the run on the server, with the retry audit installed."""
    with private_database(server_url, "buildq_chaos", keep=keep) as url:
        upgrade(url)
        engine = sa.create_engine(url)
        causes.install(engine)
        engine.dispose()
        yield url


def request(n: int) -> tuple[str, Message]:
    request_id = f"chaos-{n:05d}"
    body = BuildRequest(
        request_id,
        QUEUES[n % len(QUEUES)],
        (Change("base", "b1"),),
        (Change(f"change-{n}", f"r{n}"),),
        {"n": str(n)},
    )
    return request_id, Message(
        id=message_id(request_id, "request"), payload=body.to_bytes(), partition_key=request_id
    )


def submit_all(run: Run, queue: SqlQueue, stop: threading.Event) -> None:
    """Submit the profile's builds evenly over ``submit_over_s``, riding through outages."""
    started = time.monotonic()
    gap = run.profile.submit_over_s / run.profile.builds
    for n in range(run.profile.builds):
        if stop.wait(max(0.0, started + n * gap - time.monotonic())):
            return
        request_id, message = request(n)
        while True:
            try:
                queue.publish(topics.BUILD, message)  # idempotent: a retry is harmless
                break
            except Exception:
                if stop.wait(1.0):
                    return
        run.submitted.append(request_id)


def cancel_some(run: Run, config: Path, world: Database, stop: threading.Event) -> None:
    """Cancel a few of the youngest builds through the CLI, as an operator would."""
    gap = run.profile.submit_over_s / max(1, run.profile.cancels)
    while not stop.wait(gap) and run.cancels_sent < run.profile.cancels:
        rows = read_through_outages(
            world,
            "SELECT build_id FROM builds WHERE status IN ('ACCEPTED', 'RUNNING')"
            " ORDER BY created_at DESC LIMIT 1",
        )
        if not rows:
            continue
        done = subprocess.run(
            [BUILDQ, "cancel", rows[0][0], "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode == 0 and "requested" in done.stdout:
            run.cancels_sent += 1


def wait_for_drain(run: Run, world: Database, timeout_s: float) -> bool:
    """Whether every submitted build is finished within ``timeout_s``."""
    terminal = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
    count = f"SELECT COUNT(*) FROM builds WHERE status IN {terminal}"  # noqa: S608

    def drained() -> bool:
        rows = read_through_outages(world, count)
        return bool(rows) and rows[0][0] >= run.profile.builds

    try:
        wait_until(drained, timeout=timeout_s, interval=0.5)
    except AssertionError:
        return False
    return True


def read_through_outages(world: Database, sql: str) -> list[Any] | None:
    """The rows of ``sql``, or None while the database is away (the faults put it there)."""
    try:
        return world.read(lambda c: list(c.exec_driver_sql(sql).all()))
    except Exception:
        return None


def execute(profile: Profile, server_url: str, workdir: Path, seed: int, keep: bool) -> str:
    """One chaos run; returns the summary line; raises AssertionError listing what broke."""
    with chaos_database(server_url, keep=keep) as db_url:
        verdict, summary = _execute(Run(profile, server_url, workdir, seed, db_url))
    problems = verdict.problems()
    if problems:
        raise AssertionError(summary + "\n" + "\n".join(problems))
    return summary


def _execute(run: Run) -> tuple[audit.Verdict, str]:
    profile, workdir = run.profile, run.workdir
    server = sa.make_url(run.db_url)
    host, port = server.host or "127.0.0.1", server.port or 3306
    proxy = None if profile.real_restart else ProxyOutage(f"{host}:{port}", workdir)
    outage = ServerRestart(host, port) if profile.real_restart else proxy
    assert outage is not None
    daemon_url = server.set(host="127.0.0.1", port=proxy.port) if proxy else server
    fault_file = workdir / "status-fault-b"
    hold_file = workdir / "hold-calls-a"
    config = _write_config(workdir, daemon_url, fault_file, hold_file)
    run.nodes = [Node(f"node{i}", config, workdir) for i in range(profile.daemons)]
    world = Database(create_engine(run.db_url, pool_size=4))
    faults = FaultLog()
    stop = threading.Event()
    sampler = Sampler(run.db_url)
    started = time.monotonic()
    try:
        for node in run.nodes:
            node.spawn()
        wait_until(
            lambda: all(n.ready() for n in run.nodes),
            timeout=60,
            interval=0.2,
            message="daemons ready",
        )
        sampler.start()
        rng = random.Random(run.seed)
        injector = Injector(
            run.nodes,
            outage,
            fault_file,
            profile.schedule,
            faults,
            rng,
            hold_calls_file=hold_file,
        )
        threads = [
            threading.Thread(target=target, args=args, daemon=True)
            for target, args in (
                (submit_all, (run, SqlQueue(world), stop)),
                (cancel_some, (run, config, world, stop)),
                (run.readiness.watch, (run.nodes, stop)),
            )
        ]
        for thread in threads:
            thread.start()
        injector.start()
        threads[0].join(timeout=profile.submit_over_s + 600)
        injector.stop()
        for node in run.nodes:
            node.reap()
        drained = wait_for_drain(run, world, profile.drain_timeout_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        lifetimes = [life for node in run.nodes for life in node.lifetimes]
        verdict = audit.judge(
            run.db_url,
            run.submitted,
            FAULTED_QUEUE,
            faults,
            lifetimes,
            sampler.stop(),
            sim_state=workdir / "sim",
        )
        verdict.harness_errors += injector.errors
        if not drained:
            verdict.harness_errors.append(f"not every build finished in {profile.drain_timeout_s}s")
        run.readiness.check(run.nodes, faults, verdict)
        _stop_daemons(run, verdict)
        return verdict, _summary(run, verdict, faults, injector, time.monotonic() - started)
    finally:
        stop.set()
        for node in run.nodes:
            node.cleanup()
        if isinstance(outage, ServerRestart):
            outage.ensure_running()
        if proxy is not None:
            proxy.close()
        world.dispose()


def _write_config(workdir: Path, daemon_url: sa.URL, fault_file: Path, hold_file: Path) -> Path:
    """The daemons' config: the profile's queues and sim runners, on the database through the
    proxy (or directly, when the real server restarts)."""
    config = workdir / "buildq.toml"
    config.write_text(
        CONFIG.format(
            url=daemon_url.render_as_string(hide_password=False),
            state=workdir / "sim",
            fault=fault_file,
            hang=hold_file,
            start_by_s=START_BY_S,
            finish_by_s=FINISH_BY_S,
        )
    )
    config.chmod(0o600)
    return config


def _stop_daemons(run: Run, verdict: audit.Verdict) -> None:
    """SIGTERM every daemon: each must exit 0; none may have exited by itself meanwhile."""
    for node in run.nodes:
        node.reap()
        code = node.stop() if node.alive() else None
        if code not in (0, None):
            verdict.crashes.append(f"{node.name} exited {code} on SIGTERM")
    # Lifetimes again: the graceful stops' logs are complete now.
    verdict.crashes += [
        f"{n.name} pid {life.pid} exited by itself ({life.exit_code})"
        for n in run.nodes
        for life in n.lifetimes
        if life.end == "exited"
    ]


def _summary(
    run: Run, verdict: audit.Verdict, faults: FaultLog, injector: Injector, elapsed_s: float
) -> str:
    schedule = run.profile.schedule
    outages = faults.of("db_outage")
    restarted_in_outage = sum(
        1
        for n in run.nodes
        for life in n.lifetimes
        for w in outages
        if w.start <= life.started <= w.end
    )
    return verdict.summary(
        kills=faults.count("kill"),
        pauses=faults.count("pause"),
        db_outages=faults.count("db_outage"),
        db_fault="restart" if run.profile.real_restart else "proxy",
        status_fault_s=schedule.status_fault_for_s,
        clock_steps=injector.clock_steps,
        disk_full_s=round(sum(w.end - w.start for w in faults.of("disk_full")), 1),
        disk_full_daemons=sum(len(w.nodes) for w in faults.of("disk_full")),
        readyz_red=run.readiness.red_in_outage,
        readyz_red_disk_full=run.readiness.red_disk_full,
        readyz_green_starting=run.readiness.green_starting,
        commit_failed_disk_full=verdict.log_findings["commit_failed_disk_full"],
        restarts_in_outage=restarted_in_outage,
        cancels=run.cancels_sent,
        retriggers_same_build=verdict.retriggered_same_build,
        retry_causes=",".join(f"{k}:{v}" for k, v in sorted(verdict.retries.items())) or "-",
        dlq_causes=",".join(f"{k}:{v}" for k, v in sorted(verdict.dead_letters.items())) or "-",
        delivery_lost=verdict.log_findings["delivery_lost"],
        known_findings=verdict.log_findings["known"],
        elapsed_s=round(elapsed_s),
        seed=run.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.system.chaos.run", description=__doc__)
    parser.add_argument("--full", action="store_true", help="1,000 builds, real MariaDB restart")
    parser.add_argument("--builds", type=int, help="override the profile's build count")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the database and work dir")
    args = parser.parse_args(argv)
    profile = FULL if args.full else BOUNDED
    if args.builds:
        profile = replace(profile, builds=args.builds)
    seed = args.seed if args.seed is not None else secrets.randbelow(1_000_000)
    server = os.environ.get("BUILDQ_TEST_MYSQL_URL", DEFAULT_SERVER)
    workdir = Path(tempfile.mkdtemp(prefix="buildq-chaos-"))
    print(f"chaos: {'full' if args.full else 'bounded'} run, seed {seed}, work dir {workdir}")
    try:
        summary = execute(profile, server, workdir, seed, args.keep)
    except AssertionError as err:
        print(f"chaos: FAILED (logs kept in {workdir})\n{err}", file=sys.stderr)
        print(str(err).splitlines()[0])
        return 1
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
