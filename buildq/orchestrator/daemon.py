"""The daemon: config → database → queue → runners → controllers, until a signal says stop.

Start-up waits for the database (a daemon started during a database restart must not crash
loop); SIGTERM/SIGINT drain in-flight work and release leases; a second signal exits at once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import structlog

from buildq.buildrunner import BuildID
from buildq.config import Config
from buildq.db import READ_ONLY, Database, DbClock, create_engine, redacted_url
from buildq.metrics import Metrics
from buildq.migrations import current_revision, head_revision
from buildq.orchestrator import topics
from buildq.orchestrator.chain import Runners
from buildq.orchestrator.controllers import BuildController, BuildSignalController
from buildq.orchestrator.engine import BuildCommitter, classify
from buildq.orchestrator.http import OpsServer
from buildq.orchestrator.instrumented import (
    InstrumentedRunner,
    RunnerHealth,
    StatsRefresher,
    observe_finished,
)
from buildq.orchestrator.reconciler import DeadLetterReconciler
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.orchestrator.wiring import WiredRunners, runners_from_config
from buildq.queue.contract import TransientQueueError
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.retention import Retention
from buildq.queue.worker import Handler, Worker
from buildq.systemd import Notifier
from buildq.webhook import WebhookConfig, WebhookServer

log = structlog.get_logger("buildq.daemon")

#: How often builds woken while their poll was in flight are expedited again.
_REWAKE_INTERVAL_S = 0.1
_RETENTION_INTERVAL_S = 60.0
_NEVER = 2**31 - 1
CONSUMED_TOPICS = (topics.BUILD, topics.BUILDSIGNAL, topics.BUILD_DLQ, topics.BUILDSIGNAL_DLQ)
_HEALTH_INTERVAL_S = 2.0
#: How much longer than the grace a stop may take, whatever the database does (systemd's
#: TimeoutStopSec must be larger than shutdown_grace_s plus this).
_STOP_MARGIN_S = 5.0
#: /readyz fails when the database probe has not succeeded for this long (a hung server).
_PROBE_STALE_S = 3 * _HEALTH_INTERVAL_S + 5.0


class NotMigrated(RuntimeError):
    pass


class Daemon:
    def __init__(self, config: Config, *, on_event: Callable[..., None] | None = None) -> None:
        self.config = config
        self.on_event = on_event
        self.metrics = Metrics()
        self.runner_health = RunnerHealth(self.metrics)
        self.notifier = Notifier()
        self.stopping = threading.Event()
        self.db: Database | None = None
        self.queue: SqlQueue | None = None
        self.worker: Worker | None = None
        self.subscriptions: list[SqlSubscription] = []
        self.ops: OpsServer | None = None
        self.webhooks: WebhookServer | None = None
        self.wired: WiredRunners | None = None
        self.store: SqlBuildStore | None = None
        self._rewake: dict[str, float] = {}  # build id -> give up at (monotonic s)
        self._rewake_lock = threading.Lock()
        self._db_ok = False
        self._db_error = "not checked yet"
        self._db_ok_at = 0.0  # monotonic time of the last successful probe
        self._head_revision = head_revision()

    # --- start ----------------------------------------------------------------------------

    def start(self) -> None:
        self.wired = runners_from_config(self.config.runners)  # config errors before anything else
        webhook_config = WebhookConfig.from_table(self.config.webhooks)
        self._start_ops_server()
        self.db = self._wait_for_database()
        if self.db is None:
            return
        self.queue = SqlQueue(
            self.db,
            max_payload_bytes=self.config.daemon.max_payload_bytes,
            on_published=self.metrics.observe_published,
        )
        self.store = SqlBuildStore(self.db)
        self.worker = Worker(
            BuildCommitter(self.queue, self.store, lambda b: observe_finished(self.metrics, b)),
            lanes=self.wired.lanes,
            classify=classify,
            metrics=self.metrics,
            on_event=self.on_event,
        )
        for handler in self._handlers(webhook_config.enabled):
            settings = self.config.consumer.for_topic(handler.topic)
            if handler.never_dead_letter:
                # A reconciler retries until it succeeds: there is nowhere further to send it.
                settings = dataclasses.replace(settings, max_attempts=_NEVER)
            subscription = self._join(handler.topic, settings)
            if subscription is None:
                return  # stopped while waiting for the database
            self.subscriptions.append(subscription)
            self.worker.add(handler, subscription)
        self.worker.start()
        if self.config.consumer.workers is not None:
            log.warning(
                "consumer_workers_ignored",
                why="runner calls run in per-runner lanes: [runners.NAME] max_concurrent_calls",
            )
        if webhook_config.enabled:
            self.webhooks = WebhookServer(webhook_config, self.wired.routes, self._on_build_event)
            self.webhooks.start()
            log.info("webhooks_listening", bind=webhook_config.bind, port=self.webhooks.port)
            self._spawn(self._rewake_loop, "webhook-rewake")
        self._spawn(self._database_loop, "db-probe")
        if self.config.daemon.retention_s:
            self._spawn(self._retention_loop, "retention")
        if self.config.http.enabled:
            self._spawn(self._stats_loop, "metrics-refresh")
        self._spawn(self._watchdog_loop, "watchdog")
        self.metrics.up.set(1)
        self.notifier.ready()
        log.info("daemon_ready", database=redacted_url(self.config.database.url), pid=os.getpid())

    def _handlers(self, webhooks: bool) -> list[Handler]:
        assert self.wired is not None and self.db is not None and self.store is not None
        hooked = frozenset(r.runner_name for r in self.wired.routes) if webhooks else frozenset()
        instrumented = {
            name: InstrumentedRunner(name, runner, self.metrics, self.runner_health)
            for name, runner in self.wired.runners.items()
        }
        wired = Runners(
            instrumented, self.config.queues, webhooks=hooked, now_ms=DbClock(self.db).now_ms
        )
        return [
            BuildController(wired, self.store),
            BuildSignalController(wired, self.store),
            DeadLetterReconciler(topics.BUILD_DLQ, wired, self.store),
            DeadLetterReconciler(topics.BUILDSIGNAL_DLQ, wired, self.store),
        ]

    def _wait_for_database(self) -> Database | None:
        url = self.config.database.connect_url()
        delay = 0.5
        while not self.stopping.is_set():
            db = Database(create_engine(url, pool_size=self.config.database.pool_size))
            try:
                revision = current_revision(db.engine)
            except Exception as err:
                db.dispose()
                self._db_error = _first_line(err)
                log.warning("database_unavailable", error=self._db_error, retry_in_s=delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
                continue
            if revision != self._head_revision:
                db.dispose()
                raise NotMigrated(
                    f"database {redacted_url(self.config.database.url)} is at revision {revision}, "
                    f"not {self._head_revision}: run 'buildq db upgrade --config {self.config.path}'"
                )
            self._db_ok, self._db_ok_at = True, time.monotonic()
            self.metrics.database_up.set(1)
            return db
        return None

    def _join(self, topic: str, settings: SubscriptionSettings) -> SqlSubscription | None:
        """Join the group on ``topic``, waiting while the database refuses the writes that
        takes (down, or a full disk: an operator may need minutes): a daemon that cannot
        join yet waits as one that cannot connect does, rather than exit. None if stopped."""
        assert self.queue is not None
        delay = 0.5
        while not self.stopping.is_set():
            try:
                return self.queue.subscribe(topic, topics.GROUP, settings)
            except TransientQueueError as err:
                self._db_error = f"cannot join the consumer group on {topic!r}: {_first_line(err)}"
                log.warning("join_failed", topic=topic, error=_first_line(err), retry_in_s=delay)
                self.stopping.wait(delay)
                delay = min(delay * 2, 10.0)
        return None

    def _start_ops_server(self) -> None:
        http = self.config.http
        if not http.enabled:
            return
        self.ops = OpsServer(http.bind, http.port, self.metrics, self.healthz, self.readyz)
        self.ops.start()
        log.info("ops_http_listening", bind=http.bind, port=self.ops.port)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        threading.Thread(target=target, name=name, daemon=True).start()

    def _on_build_event(self, runner_name: str, build_id: BuildID) -> None:
        """A signed CI event: poll that build now, through its one pending poll message.

        The pending delayed poll is made due instead of publishing a second one, so a webhook
        never forks a build's poll chain. Builds we did not trigger are ignored.
        """
        assert self.queue is not None and self.store is not None
        build = self.store.get_by_build(build_id.id)
        if build is None or build.is_terminal or build.runner != runner_name:
            log.debug("webhook_event_ignored", build_id=build_id.id, runner=runner_name)
            return
        woken = self.queue.expedite(topics.BUILDSIGNAL, build_id.id)
        log.info("webhook_event", build_id=build_id.id, runner=runner_name, expedited=woken)
        if not woken:
            # The poll is in flight and may have read the state before this event: expedite
            # the poll it schedules next, for as long as a delivery may stay in flight.
            timeout_ms = self.config.consumer.for_topic(topics.BUILDSIGNAL).visibility_timeout_ms
            with self._rewake_lock:
                self._rewake[build_id.id] = time.monotonic() + timeout_ms / 1000

    def _rewake_loop(self) -> None:
        """Expedite the next poll of builds woken while their poll was in flight."""
        assert self.queue is not None
        while not self.stopping.wait(_REWAKE_INTERVAL_S):
            with self._rewake_lock:
                pending = list(self._rewake.items())
            for build_id, give_up_at in pending:
                try:
                    woken = self.queue.expedite(topics.BUILDSIGNAL, build_id)
                    # The poll in flight may have been the last one: a finished build has no
                    # next poll to wake, so stop now instead of trying until the timeout.
                    done = not woken and self._finished(build_id)
                except Exception as err:  # the safety poll still comes
                    log.warning("webhook_rewake_failed", build_id=build_id, error=_first_line(err))
                    woken, done = 0, False
                if woken or done or time.monotonic() >= give_up_at:
                    with self._rewake_lock:
                        self._rewake.pop(build_id, None)
                    log.info("webhook_rewake", build_id=build_id, expedited=woken)

    def _finished(self, build_id: str) -> bool:
        assert self.store is not None
        build = self.store.get_by_build(build_id)
        return build is None or build.is_terminal

    # --- health -------------------------------------------------------------------------------

    def _retention_loop(self) -> None:
        """Delete messages every group is done with once they are past retention.

        Every daemon runs it; the deletes are conditional, so running it twice is harmless.
        """
        assert self.db is not None
        retention = Retention(self.db, int(self.config.daemon.retention_s * 1000))
        while not self.stopping.wait(_RETENTION_INTERVAL_S):
            try:
                result = retention.purge()
            except Exception as err:  # the next round tries again
                log.warning("retention_failed", error=_first_line(err))
                continue
            if result.deleted:
                log.info("retention_purged", deleted=result.deleted)

    def _database_loop(self) -> None:
        """Probe the database for /readyz; on its own thread, as a hung server blocks it."""
        while not self.stopping.wait(_HEALTH_INTERVAL_S):
            assert self.db is not None
            was_ok = self._db_ok
            try:
                with self.db.read_engine.connect().execution_options(**{READ_ONLY: True}) as conn:
                    revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version")
                    found = revision.scalar()
                    conn.rollback()
            except Exception as err:
                self._db_ok, self._db_error = False, _first_line(err)
            else:
                self._db_ok = found == self._head_revision
                self._db_error = (
                    "" if self._db_ok else f"schema at revision {found}, not {self._head_revision}"
                )
                if self._db_ok:
                    self._db_ok_at = time.monotonic()
            self.metrics.database_up.set(1 if self._db_ok else 0)
            writable = self.worker is None or self.worker.problem() is None
            self.metrics.database_writable.set(1 if writable else 0)
            if was_ok != self._db_ok:  # say it once when it changes, not on every probe
                if self._db_ok:
                    log.info("database_available")
                else:
                    log.warning("database_unavailable", error=self._db_error)

    def _stats_loop(self) -> None:
        assert self.db is not None and self.queue is not None
        admin = QueueAdmin(self.db, self.queue.store)
        refresher = StatsRefresher(self.db, admin, self.metrics, self.config.queues)
        refresher.run(self.config.http.metrics_refresh_s, self.stopping)

    def _watchdog_loop(self) -> None:
        interval = min(self.notifier.watchdog_interval_s or _HEALTH_INTERVAL_S, _HEALTH_INTERVAL_S)
        while not self.stopping.wait(interval):
            if self.healthz()[0]:
                self.notifier.watchdog()

    def healthz(self) -> tuple[bool, str]:
        """Alive and its loops ticking (the database may be down: that is /readyz). A slow
        or hung CI service is neither: its runner's lane fills, and nothing else waits."""
        if self.worker is None or len(self.subscriptions) < len(CONSUMED_TOPICS):
            return (not self.stopping.is_set(), "starting")
        db_ok, db_error = self._database_ok()
        if not db_ok:
            # The loops are waiting on the database: that is an outage for /readyz to report,
            # not a wedged process for the watchdog to kill.
            return True, f"alive; database unavailable: {db_error}"
        idle_s = max(s.settings.poll_interval_ms for s in self.subscriptions) / 1000
        return self.worker.health(max_age_s=max(30.0, idle_s * 10))

    def _database_ok(self) -> tuple[bool, str]:
        if not self._db_ok:
            return False, self._db_error
        if time.monotonic() - self._db_ok_at > _PROBE_STALE_S:
            return False, f"no answer to the probe for over {_PROBE_STALE_S:g}s"
        return True, ""

    def readyz(self) -> tuple[bool, str]:
        """Database reachable and migrated (probed every 2 s), controllers consuming."""
        if self.stopping.is_set():
            return False, "stopping"
        db_ok, db_error = self._database_ok()
        if not db_ok:
            return False, f"database unavailable: {db_error}"
        if self.worker is None or len(self.subscriptions) < len(CONSUMED_TOPICS):
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

    # --- stop ---------------------------------------------------------------------------------

    def stop(self, *, quiet: bool = False) -> None:
        """Drain and release. ``quiet``: start-up failed, and the one line saying why (printed
        by ``buildq run``) is all an operator should have to read."""
        self.stopping.set()
        self.metrics.up.set(0)
        self.notifier.stopping()
        if not quiet:
            log.info("daemon_stopping", grace_s=self.config.daemon.shutdown_grace_s)
        grace_s = self.config.daemon.shutdown_grace_s
        deadline = time.monotonic() + grace_s + _STOP_MARGIN_S
        if self.worker is not None:
            self.worker.stop(grace_s)
        self._leave_groups(deadline)
        if self.webhooks is not None:
            self.webhooks.stop()
        if self.ops is not None:
            self.ops.stop()
        if self.wired is not None:
            self.wired.close()
        if self.db is not None:
            self.db.dispose()
        if not quiet:
            log.info("daemon_stopped")

    def _leave_groups(self, deadline: float) -> None:
        """Hand back what is left and release the leases, all subscriptions at once, for as
        long as ``deadline`` allows: with the database down each write would retry for half a
        minute. Whatever is not done by then is safe to leave: the claims time out and the
        leases expire, and the other daemons take over."""
        assert self.queue is not None or not self.subscriptions
        queue = self.queue

        def leave(subscription: SqlSubscription) -> None:
            try:
                assert queue is not None
                queue.unsubscribe(subscription)
            except Exception as err:  # leases expire on their own
                log.warning("unsubscribe_failed", topic=subscription.topic, error=_first_line(err))

        threads = [
            threading.Thread(target=leave, args=(s,), name=f"leave-{s.topic}", daemon=True)
            for s in self.subscriptions
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
        left = [t.name for t in threads if t.is_alive()]
        if left:
            log.warning("stop_left_leases_to_expire", subscriptions=left)

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; a second signal exits at once."""
        signals_seen: list[int] = []

        def on_signal(signum: int, _frame: Any) -> None:
            signals_seen.append(signum)
            if len(signals_seen) > 1:
                os._exit(1)
            self.stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        while not self.stopping.wait(1.0):
            pass
        self.stop()
        return 0


def _first_line(err: BaseException) -> str:
    orig = getattr(err, "orig", None)
    return (
        str(orig if orig is not None else err).splitlines()[0][:300]
        if str(err)
        else type(err).__name__
    )
