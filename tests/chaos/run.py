"""The chaos run: three daemons on one MariaDB, faults while builds flow, invariants checked.

    python -m tests.chaos.run            # the bounded run (what tests/chaos/test_chaos.py runs)
    python -m tests.chaos.run --full     # make chaos: 1,000 builds, a real MariaDB restart

The server comes from ``BUILDQ_TEST_MYSQL_URL`` (default ``mysql+pymysql://root@127.0.0.1:3306/test``);
the run creates its own database on it and drops it afterwards (``--keep`` keeps it, and the
work directory, for a post-mortem). The last line printed is the summary:
``CHAOS builds=… lost=0 duplicated=0 forked=0 …``; the exit code is 0 when every invariant held.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import sqlalchemy as sa

from buildq.buildrunner import Change
from buildq.db import Database, create_engine
from buildq.migrations import upgrade
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.queue.contract import Message, message_id
from buildq.queue.sql import SqlQueue
from tests.chaos import audit
from tests.chaos.cluster import Node
from tests.chaos.faults import FaultLog, Injector, ProxyOutage, Schedule, ServerRestart
from tests.e2e.harness import BUILDQ
from tests.support import wait_until

DEFAULT_SERVER = "mysql+pymysql://root@127.0.0.1:3306/test"
FAULTED_QUEUE = "b"
QUEUES = ("a", FAULTED_QUEUE)


@dataclass(frozen=True)
class Profile:
    builds: int
    submit_over_s: float
    schedule: Schedule
    drain_timeout_s: float
    real_restart: bool
    cancels: int
    daemons: int = 3


BOUNDED = Profile(
    builds=150,
    submit_over_s=55.0,
    schedule=Schedule(
        duration_s=65.0,
        pause_at_s=10.0,
        pause_for_s=13.0,
        outage_at_s=25.0,
        outage_for_s=8.0,
        status_fault_at_s=42.0,
        status_fault_for_s=6.0,
    ),
    drain_timeout_s=120.0,
    real_restart=False,
    cancels=6,
)

FULL = Profile(
    builds=1000,
    submit_over_s=240.0,
    schedule=Schedule(
        duration_s=250.0,
        pause_at_s=40.0,
        pause_for_s=13.0,
        outage_at_s=100.0,
        outage_for_s=10.0,
        status_fault_at_s=170.0,
        status_fault_for_s=8.0,
    ),
    drain_timeout_s=300.0,
    real_restart=True,
    cancels=30,
)

#: Fast leases so a kill is taken over within seconds. The visibility timeout (10 s) stays
#: well above how long a claim may wait in a busy daemon's memory on a small CI machine: with
#: 4 s, claims of a CPU-starved (not faulted) daemon timed out there and were delivered twice
#: (reported: the framework does not renew a claim that waited before processing it). The
#: buildsignal retry budget (5 attempts: 0.3 + 0.6 + 1.2 + 2.4 s of backoff) outlasts a short
#: status fault for polls that meet its end and not for those that meet its start: both paths
#: are taken.
CONFIG = """\
[database]
url = "{url}"
pool_size = 6

[daemon]
shutdown_grace_s = 20
log_format = "json"
log_level = "debug"

[http]
port = 0

[consumer]
workers = 8

[consumer.defaults]
slots = 16
lease_duration_ms = 2000
renew_interval_ms = 300
heartbeat_stale_ms = 2000
visibility_timeout_ms = 10000
max_attempts = 5
backoff_initial_ms = 300
backoff_multiplier = 2.0
backoff_cap_ms = 3000
backoff_jitter = 0.0
poll_interval_ms = 50
batch_size = 16

[runners.sim_a]
type = "sim"
accepted_s = 0.5
accepted_max_s = 1.5
running_s = 1.5
running_max_s = 4.0
failure_probability = 0.3
state_dir = "{state}"

[runners.sim_b]
type = "sim"
accepted_s = 0.5
accepted_max_s = 1.5
running_s = 1.5
running_max_s = 4.0
failure_probability = 0.3
state_dir = "{state}"
status_fault_file = "{fault}"

[poll]
accepted_interval_s = 0.3
running_interval_s = 0.5
growth = 1.1
max_interval_s = 1.0
jitter = 0.2

[queues.a]
runner = "sim_a"

[queues.b]
runner = "sim_b"
"""


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
    readyz: list[tuple[float, str, int | None]] = field(default_factory=list)


@contextmanager
def chaos_database(server_url: str, keep: bool = False) -> Iterator[str]:
    """A fresh, migrated database for the run on the server, with the retry audit installed."""
    server = sa.make_url(server_url)
    name = f"buildq_chaos_{secrets.token_hex(4)}"
    admin = sa.create_engine(server, pool_pre_ping=True)
    with admin.begin() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE {name} CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        upgrade(url)
        engine = sa.create_engine(url)
        audit.install(engine)
        engine.dispose()
        yield url
    finally:
        if not keep:
            with admin.begin() as conn:
                conn.exec_driver_sql(f"DROP DATABASE IF EXISTS {name}")
        admin.dispose()


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
        try:
            rows = world.read(
                lambda c: c.exec_driver_sql(
                    "SELECT build_id FROM builds WHERE status IN ('ACCEPTED', 'RUNNING')"
                    " ORDER BY created_at DESC LIMIT 1"
                ).all()
            )
        except Exception:
            continue
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


def watch_readiness(run: Run, stop: threading.Event) -> None:
    while not stop.wait(0.5):
        for node in run.nodes:
            run.readyz.append((time.time(), node.name, node.readyz()))


def check_readiness(run: Run, faults: FaultLog, verdict: audit.Verdict) -> int:
    """/readyz went red during the outage (once the probe noticed) and green after it.

    Returns how many red answers were seen during outages.
    """
    red = 0
    for window in faults.of("db_outage"):
        during = [c for t, _, c in run.readyz if window.start + 3 <= t <= window.end]
        red += during.count(503)
        if 503 not in during:
            verdict.readiness.append(f"/readyz never red during the outage ({set(during)})")
        if 200 in during:
            verdict.readiness.append("/readyz green while the database was unreachable")
    with contextlib.suppress(AssertionError):  # one restarted by the last kill may be starting
        wait_until(lambda: all(n.ready() for n in run.nodes), timeout=60, interval=0.2)
    for node in run.nodes:
        if not node.ready():
            verdict.readiness.append(f"{node.name} not ready at the end")
        elif node.readyz() != 200:
            verdict.readiness.append(f"{node.name} /readyz is {node.readyz()} at the end")
    return red


def wait_for_drain(run: Run, world: Database, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    terminal = "('SUCCEEDED', 'FAILED', 'CANCELLED')"
    while time.monotonic() < deadline:
        try:
            done = world.read(
                lambda c: c.exec_driver_sql(
                    f"SELECT COUNT(*) FROM builds WHERE status IN {terminal}"  # noqa: S608
                ).scalar_one()
            )
        except Exception:
            done = -1
        if done >= run.profile.builds:
            return True
        time.sleep(0.5)
    return False


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
    rng = random.Random(run.seed)
    server = sa.make_url(run.db_url)
    host, port = server.host or "127.0.0.1", server.port or 3306
    proxy = None if profile.real_restart else ProxyOutage(f"{host}:{port}", workdir)
    outage = ServerRestart(host, port) if profile.real_restart else proxy
    assert outage is not None
    daemon_url = server.set(host="127.0.0.1", port=proxy.port) if proxy else server
    fault_file = workdir / "status-fault-b"
    config = workdir / "buildq.toml"
    config.write_text(
        CONFIG.format(
            url=daemon_url.render_as_string(hide_password=False),
            state=workdir / "sim",
            fault=fault_file,
        )
    )
    config.chmod(0o600)
    run.nodes = [Node(f"node{i}", config, workdir) for i in range(profile.daemons)]
    world = Database(create_engine(run.db_url, pool_size=4))
    faults = FaultLog()
    stop = threading.Event()
    sampler = audit.Sampler(run.db_url)
    threads: list[threading.Thread] = []
    started = time.monotonic()
    try:
        for node in run.nodes:
            node.spawn()
        _wait(lambda: all(n.ready() for n in run.nodes), 60, "daemons ready")
        sampler.start()
        injector = Injector(run.nodes, outage, fault_file, profile.schedule, faults, rng)
        queue = SqlQueue(world)
        for target, args in (
            (submit_all, (run, queue, stop)),
            (cancel_some, (run, config, world, stop)),
            (watch_readiness, (run, stop)),
        ):
            thread = threading.Thread(target=target, args=args, daemon=True)
            thread.start()
            threads.append(thread)
        injector.start()
        threads[0].join(timeout=profile.submit_over_s + 600)
        injector.stop()
        for node in run.nodes:
            node.reap()
        drained = wait_for_drain(run, world, profile.drain_timeout_s)
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
        samples = sampler.stop()
        lifetimes = [life for node in run.nodes for life in node.lifetimes]
        verdict = audit.judge(run.db_url, run.submitted, FAULTED_QUEUE, faults, lifetimes, samples)
        verdict.harness_errors += injector.errors
        if not drained:
            verdict.harness_errors.append(f"not every build finished in {profile.drain_timeout_s}s")
        red = check_readiness(run, faults, verdict)
        outages = faults.of("db_outage")
        restarted_in_outage = sum(
            1
            for n in run.nodes
            for life in n.lifetimes
            for w in outages
            if w.start <= life.started <= w.end
        )
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
        summary = verdict.summary(
            kills=faults.count("kill"),
            pauses=faults.count("pause"),
            db_outages=faults.count("db_outage"),
            db_fault="restart" if profile.real_restart else "proxy",
            status_fault_s=profile.schedule.status_fault_for_s,
            readyz_red=red,
            restarts_in_outage=restarted_in_outage,
            cancels=run.cancels_sent,
            retriggers_same_build=verdict.retriggered_same_build,
            retry_causes=",".join(f"{k}:{v}" for k, v in sorted(verdict.retries.items())) or "-",
            dlq_causes=",".join(f"{k}:{v}" for k, v in sorted(verdict.dead_letters.items())) or "-",
            delivery_lost=verdict.log_findings["delivery_lost"],
            known_findings=verdict.log_findings["known"],
            elapsed_s=round(time.monotonic() - started),
            seed=run.seed,
        )
        return verdict, summary
    finally:
        stop.set()
        for node in run.nodes:
            node.cleanup()
        if isinstance(outage, ServerRestart):
            outage.ensure_running()
        if proxy is not None:
            proxy.close()
        world.dispose()


def _wait(condition: Callable[[], object], timeout: float, what: str) -> None:
    wait_until(condition, timeout=timeout, interval=0.2, message=what)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos.run", description=__doc__)
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
