"""The daemon: config → database → queue → runners → controllers, until a signal says stop.

The composition root: it turns config into backends, starts them in order and stops them in
reverse. Start-up waits for the database (a daemon started during a database restart must not
crash loop); SIGTERM/SIGINT drain in-flight work and release leases; a second signal exits at
once. What runs meanwhile has its own module: ``health`` (/healthz, /readyz, the database
probe, the watchdog), ``rewake`` (webhooks), ``upkeep`` (retention), ``engine`` (the worker's
committer and error classifier).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import structlog

from buildq.config import Config
from buildq.metrics import Metrics
from buildq.migrations import current_revision, head_revision
from buildq.orchestrator import topics
from buildq.orchestrator.chain import Runners
from buildq.orchestrator.controllers import BuildController, BuildSignalController
from buildq.orchestrator.engine import BuildCommitter, classify
from buildq.orchestrator.health import DatabaseProbe, Health
from buildq.orchestrator.http import OpsServer
from buildq.orchestrator.instrumented import (
    InstrumentedRunner,
    RunnerHealth,
    StatsRefresher,
    observe_finished,
)
from buildq.orchestrator.reconciler import DeadLetterReconciler
from buildq.orchestrator.rewake import WebhookRewake
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.orchestrator.upkeep import purge_retained
from buildq.orchestrator.wiring import WiredRunners, runners_from_config
from buildq.queue import NotMigrated
from buildq.queue.contract import TransientQueueError
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.retention import Retention
from buildq.queue.worker import Handler, Worker
from buildq.storage.database import Database, DbClock, create_engine, redacted_url
from buildq.storage.errors import first_line
from buildq.systemd import Notifier
from buildq.webhook import WebhookConfig, WebhookServer

log = structlog.get_logger("buildq.daemon")

_NEVER = 2**31 - 1
CONSUMED_TOPICS = (topics.BUILD, topics.BUILDSIGNAL, topics.BUILD_DLQ, topics.BUILDSIGNAL_DLQ)
#: How much longer than the grace a stop may take, whatever the database does (systemd's
#: TimeoutStopSec must be larger than shutdown_grace_s plus this).
_STOP_MARGIN_S = 5.0


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
        self.probe = DatabaseProbe(self.metrics, head_revision())
        self.health = Health(
            self.probe, self.runner_health, self.stopping, topics=len(CONSUMED_TOPICS)
        )

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
        self.health.attach(self.worker, self.subscriptions)
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
            in_flight_ms = self.config.consumer.for_topic(topics.BUILDSIGNAL).visibility_timeout_ms
            rewake = WebhookRewake(self.queue, self.store, in_flight_ms)
            self.webhooks = WebhookServer(webhook_config, self.wired.routes, rewake.on_build_event)
            self.webhooks.start()
            log.info("webhooks_listening", bind=webhook_config.bind, port=self.webhooks.port)
            self._spawn("webhook-rewake", rewake.run, self.stopping)
        self._spawn("db-probe", self.probe.run, self.db, self.stopping, self.health.writable)
        if self.config.daemon.retention_s:
            retention = Retention(self.db, int(self.config.daemon.retention_s * 1000))
            self._spawn("retention", purge_retained, retention, self.stopping)
        if self.config.http.enabled:
            admin = QueueAdmin(self.db, self.queue.store)
            refresher = StatsRefresher(self.db, admin, self.metrics, self.config.queues)
            interval_s = self.config.http.metrics_refresh_s
            self._spawn("metrics-refresh", refresher.run, interval_s, self.stopping)
        self._spawn("watchdog", self.health.pet_watchdog, self.notifier)
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

    def _attempts(self) -> Iterator[float]:
        """One backoff for both of start-up's waits on the database (connect, join): yields
        the delay to report, and sleeps it (doubling, to 10 s) only when the caller comes back
        for another attempt; ends once stopping."""
        delay = 0.5
        while not self.stopping.is_set():
            yield delay
            self.stopping.wait(delay)
            delay = min(delay * 2, 10.0)

    def _wait_for_database(self) -> Database | None:
        url = self.config.database.connect_url()
        for delay in self._attempts():
            db = Database(create_engine(url, pool_size=self.config.database.pool_size))
            try:
                revision = current_revision(db.engine)
            except Exception as err:
                db.dispose()
                self.probe.error = first_line(err)
                log.warning("database_unavailable", error=self.probe.error, retry_in_s=delay)
                continue
            head = self.probe.head_revision
            if revision != head:
                db.dispose()
                raise NotMigrated(
                    f"database {redacted_url(self.config.database.url)} is at revision {revision}, "
                    f"not {head}: run 'buildq db upgrade --config {self.config.path}'"
                )
            self.probe.connected()
            return db
        return None

    def _join(self, topic: str, settings: SubscriptionSettings) -> SqlSubscription | None:
        """Join the group on ``topic``, waiting while the database refuses the writes that
        takes (down, or a full disk: an operator may need minutes): a daemon that cannot
        join yet waits as one that cannot connect does, rather than exit. None if stopped."""
        assert self.queue is not None
        for delay in self._attempts():
            try:
                return self.queue.subscribe(topic, topics.GROUP, settings)
            except TransientQueueError as err:
                self.probe.error = f"cannot join the consumer group on {topic!r}: {first_line(err)}"
                log.warning("join_failed", topic=topic, error=first_line(err), retry_in_s=delay)
        return None

    def _start_ops_server(self) -> None:
        http = self.config.http
        if not http.enabled:
            return
        self.ops = OpsServer(
            http.bind, http.port, self.metrics, self.health.healthz, self.health.readyz
        )
        self.ops.start()
        log.info("ops_http_listening", bind=http.bind, port=self.ops.port)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> None:
        threading.Thread(target=target, args=args, name=name, daemon=True).start()

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
                log.warning("unsubscribe_failed", topic=subscription.topic, error=first_line(err))

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
