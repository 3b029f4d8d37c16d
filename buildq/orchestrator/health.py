"""The daemon's health: ``/healthz`` (alive, its loops ticking), ``/readyz`` (ready for work:
the database reachable and migrated, every topic consumed, no runner refusing its token), the
database probe behind them, and the systemd watchdog, which follows ``/healthz``.

A database that is down is an outage for /readyz to report, not a wedged process for the
watchdog to kill; a slow or hung CI service is neither (its runner's lane fills, and nothing
else waits).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import structlog

from buildq.metrics import Metrics
from buildq.orchestrator.instrumented import RunnerHealth
from buildq.queue.sql import SqlSubscription
from buildq.queue.worker import Worker
from buildq.storage.database import READ_ONLY, Database
from buildq.storage.errors import first_line
from buildq.systemd import Notifier

log = structlog.get_logger("buildq.daemon")

HEALTH_INTERVAL_S = 2.0
#: /readyz fails when the database probe has not succeeded for this long (a hung server).
_PROBE_STALE_S = 3 * HEALTH_INTERVAL_S + 5.0


class DatabaseProbe:
    """Whether the database answers and has this version's schema: probed every 2 s on a
    thread of its own, as a hung server blocks it."""

    def __init__(self, metrics: Metrics, head_revision: str) -> None:
        self.metrics = metrics
        self.head_revision = head_revision
        self.ok = False
        #: Why not ``ok`` (start-up sets it too, while it waits for the database).
        self.error = "not checked yet"
        self._ok_at = 0.0  # monotonic time of the last successful probe

    def connected(self) -> None:
        """Start-up found the database, migrated."""
        self.ok, self._ok_at = True, time.monotonic()
        self.metrics.database_up.set(1)

    def run(self, db: Database, stopping: threading.Event, writable: Callable[[], bool]) -> None:
        """Probe until ``stopping``; ``writable`` says whether writes go through."""
        while not stopping.wait(HEALTH_INTERVAL_S):
            was_ok = self.ok
            try:
                with db.read_engine.connect().execution_options(**{READ_ONLY: True}) as conn:
                    revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version")
                    found = revision.scalar()
                    conn.rollback()
            except Exception as err:
                self.ok, self.error = False, first_line(err)
            else:
                self.ok = found == self.head_revision
                self.error = (
                    "" if self.ok else f"schema at revision {found}, not {self.head_revision}"
                )
                if self.ok:
                    self._ok_at = time.monotonic()
            self.metrics.database_up.set(1 if self.ok else 0)
            self.metrics.database_writable.set(1 if writable() else 0)
            if was_ok != self.ok:  # say it once when it changes, not on every probe
                if self.ok:
                    log.info("database_available")
                else:
                    log.warning("database_unavailable", error=self.error)

    def status(self) -> tuple[bool, str]:
        if not self.ok:
            return False, self.error
        if time.monotonic() - self._ok_at > _PROBE_STALE_S:
            return False, f"no answer to the probe for over {_PROBE_STALE_S:g}s"
        return True, ""


class Health:
    """The answers of /healthz and /readyz."""

    def __init__(
        self,
        probe: DatabaseProbe,
        runner_health: RunnerHealth,
        stopping: threading.Event,
        *,
        topics: int,
    ) -> None:
        """``topics``: how many topics the daemon consumes (it is starting until it has
        joined them all)."""
        self.probe = probe
        self.runner_health = runner_health
        self.stopping = stopping
        self.topics = topics
        self.worker: Worker | None = None
        self.subscriptions: Sequence[SqlSubscription] = ()

    def attach(self, worker: Worker, subscriptions: Sequence[SqlSubscription]) -> None:
        """The worker, and the list of subscriptions the daemon fills as it joins."""
        self.worker, self.subscriptions = worker, subscriptions

    def healthz(self) -> tuple[bool, str]:
        """Alive and its loops ticking (the database may be down: that is /readyz). A slow
        or hung CI service is neither: its runner's lane fills, and nothing else waits."""
        if self.worker is None or len(self.subscriptions) < self.topics:
            return (not self.stopping.is_set(), "starting")
        db_ok, db_error = self.probe.status()
        if not db_ok:
            # The loops are waiting on the database: that is an outage for /readyz to report,
            # not a wedged process for the watchdog to kill.
            return True, f"alive; database unavailable: {db_error}"
        idle_s = max(s.settings.poll_interval_ms for s in self.subscriptions) / 1000
        return self.worker.health(max_age_s=max(30.0, idle_s * 10))

    def readyz(self) -> tuple[bool, str]:
        """Database reachable and migrated (probed every 2 s), controllers consuming."""
        if self.stopping.is_set():
            return False, "stopping"
        db_ok, db_error = self.probe.status()
        if not db_ok:
            return False, f"database unavailable: {db_error}"
        if self.worker is None or len(self.subscriptions) < self.topics:
            return False, "starting"
        healthy, why = self.healthz()
        if not healthy:
            return False, why
        failing = self.worker.problem()
        if failing is not None:
            return False, failing
        refused = self.runner_health.problems()
        if refused:
            # Builds on these runners wait (they are polled until their deadline): an
            # operator has to fix the token. Not /healthz: restarting would not help.
            return False, "; ".join(
                f"runner {name}: {why}" for name, why in sorted(refused.items())
            )
        return True, "ready"

    def writable(self) -> bool:
        """Writes go through (no hand-off or lease renewal failing), as far as we know."""
        return self.worker is None or self.worker.problem() is None

    def pet_watchdog(self, notifier: Notifier) -> None:
        """Tell systemd we are alive while /healthz says so, until stopping."""
        interval = min(notifier.watchdog_interval_s or HEALTH_INTERVAL_S, HEALTH_INTERVAL_S)
        while not self.stopping.wait(interval):
            if self.healthz()[0]:
                notifier.watchdog()
