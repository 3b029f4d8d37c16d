"""The ``Worker``: the pipeline that runs handlers over subscriptions, and its lifecycle.

    fetch (a thread per subscription) → plan (a batch at a time) → jobs in lanes → steps
    → commit (one transaction for every step that is ready)

Here: the fetch loops (each waits only for its own room), planning, handing each job to its
lane or running it inline, accounting for what was settled, health, and stop. The parts have
modules of their own: ``lanes`` (threads per kind of I/O, room, call timeouts), ``partitions``
(one delivery of a partition at a time), ``execute`` (running one job, and what its outcome
means), ``commits`` (the commit thread), ``tasks`` (a delivery on its way through). The
overview is in the package's docstring (``buildq.queue.worker``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from buildq.queue.contract import (
    Ack,
    Committer,
    Defer,
    Delivery,
    HandBack,
    Nack,
    Reject,
    Settled,
    Step,
    Subscription,
    TransientQueueError,
)
from buildq.queue.worker.commits import Commits
from buildq.queue.worker.contract import (
    Classifier,
    EventHook,
    Handler,
    Job,
    LaneSettings,
    Postpone,
    WorkerMetrics,
)
from buildq.queue.worker.execute import Executor, raiser
from buildq.queue.worker.lanes import Lanes
from buildq.queue.worker.partitions import Partitions
from buildq.queue.worker.tasks import Route, Task, describe, uncount

log = structlog.get_logger("buildq.worker")

#: A batch whose plan could not read what it needs is deferred this long (no retry counted).
_REPLAN_AFTER_MS = 1_000
#: After the grace period, how long stop() still gives the commit thread to hand back.
_STOP_MARGIN_S = 3.0


class Worker:
    """Runs handlers over their subscriptions; see the module docstring."""

    def __init__(
        self,
        committer: Committer,
        *,
        lanes: Mapping[str, LaneSettings] | None = None,
        classify: Classifier | None = None,
        metrics: WorkerMetrics | None = None,
        on_event: EventHook | None = None,
        max_commit_batch: int = 512,
    ) -> None:
        self._metrics = metrics
        self._on_event = on_event
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._routes: list[Route] = []
        self._partitions = Partitions()
        self._executor = Executor(classify, self._emit, self._finish)
        self._commits = Commits(
            committer,
            self._lock,
            max_batch=max_commit_batch,
            metrics=metrics,
            action_for=self._executor.action_for,
            finish=self._finish,
        )
        self._lanes = Lanes(
            self._lock, lanes or {}, run=self._run, settle=self._commits.put, metrics=metrics
        )
        self._threads: list[threading.Thread] = []
        self._commit_thread: threading.Thread | None = None

    def add(self, handler: Handler, subscription: Subscription) -> None:
        if handler.topic != subscription.topic:
            raise ValueError(
                f"handler of {handler.topic!r} on a subscription of {subscription.topic!r}"
            )
        self._routes.append(Route(handler, subscription, threading.Condition(self._lock)))

    def start(self) -> None:
        self._commit_thread = self._spawn("commit", self._commits.run)
        self._spawn("worker-watch", self._lanes.watch, self._stopping)
        for route in self._routes:
            self._spawn(f"fetch-{route.subscription.topic}", self._fetch_loop, route)

    def wait_ready(self, timeout_s: float) -> bool:
        """True once every subscription holds its leases (it can fetch)."""
        deadline = time.monotonic() + timeout_s
        return all(
            route.subscription.wait_for_leases(max(0.0, deadline - time.monotonic()))
            for route in self._routes
        )

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)
        return thread

    # --- fetching ---------------------------------------------------------------------------

    def _fetch_loop(self, route: Route) -> None:
        subscription = route.subscription
        settings = subscription.settings
        idle_s = settings.poll_interval_ms / 1000
        # Claimed deliveries wait in memory only briefly; the claim is kept alive meanwhile.
        limit = max(2, settings.batch_size * 2)
        fetch_now = True
        while not self._stopping.is_set():
            route.last_tick = time.monotonic()
            try:
                self._start_released(route)
                room = self._wait_for_room(route, limit, idle_s)
                if room <= 0:
                    continue
                if not fetch_now:
                    fetch_now = self._wait_until_due(subscription, idle_s)
                    continue
                want = min(settings.batch_size, room)
                deliveries = subscription.fetch(want)
                fetch_now = len(deliveries) == want
                if deliveries:
                    self._dispatch(route, deliveries)
            except Exception as err:  # database down: keep trying, /readyz reports it
                log.warning("fetch_failed", topic=subscription.topic, error=describe(err)[:300])
                self._emit("fetch_failed", topic=subscription.topic)
                self._stopping.wait(min(5.0, idle_s * 10))
                fetch_now = False

    def _wait_until_due(self, subscription: Subscription, idle_s: float) -> bool:
        """Sleep until the next delivery is due, a local publish, or ``idle_s``: True if a
        fetch should follow at once."""
        due = subscription.next_due_ms()
        if due is not None and due <= 0:
            return True
        wait_s = idle_s if due is None else min(idle_s, due / 1000)
        woken = subscription.wait(wait_s)
        return woken or (due is not None and due <= wait_s * 1000)

    def _wait_for_room(self, route: Route, limit: int, idle_s: float) -> int:
        """Wait until at least half the fetcher's room is free: refilling it one delivery at a
        time would cost a claim transaction per delivery."""
        with self._lock:
            if route.moving > limit // 2 and not route.released and not self._stopping.is_set():
                route.room.wait(max(idle_s, 0.05))
            return limit - route.moving

    def _dispatch(self, route: Route, deliveries: Sequence[Delivery]) -> None:
        fetched_at = time.monotonic()
        with self._lock:
            route.moving += len(deliveries)
        for delivery in deliveries:
            self._observe_lag(delivery)
        tasks = [Task(route, job, fetched_at) for job in self._plan(route, deliveries)]
        ready = self._admit(tasks)
        self._run_inline([t for t in ready if self._lanes.is_inline(t)])
        for task in ready:
            if not self._lanes.is_inline(task):
                self._start(task)

    def _plan(self, route: Route, deliveries: Sequence[Delivery]) -> Sequence[Job]:
        try:
            jobs = route.handler.plan(deliveries)
            if len(jobs) != len(deliveries):
                raise RuntimeError(f"plan returned {len(jobs)} jobs for {len(deliveries)}")
            return jobs
        except TransientQueueError as err:  # its read failed: nobody's failure, try later
            log.warning("plan_failed", topic=route.subscription.topic, error=describe(err))
            later = Postpone(f"planning failed: {describe(err)}", _REPLAN_AFTER_MS)
            return [Job(d, raiser(later)) for d in deliveries]
        except Exception as err:  # a bug in plan: each delivery fails on its own
            log.exception("plan_failed", topic=route.subscription.topic)
            return [Job(d, raiser(err)) for d in deliveries]

    def _admit(self, tasks: list[Task]) -> list[Task]:
        """The tasks that may start now; each one whose partition is busy waits behind its
        predecessor instead."""
        with self._lock:
            return [task for task in tasks if self._partitions.admit(task)]

    def _start_released(self, route: Route) -> None:
        """Start what waited behind its partition, planned again: what the plan read when it
        was claimed may have changed since (its predecessor just wrote)."""
        with self._lock:
            released, route.released = route.released, []
        if not released:
            return
        jobs = self._plan(route, [task.job.delivery for task in released])
        for task, job in zip(released, jobs, strict=True):
            task.job = job
            self._start(task)

    def _start(self, task: Task) -> None:
        if self._lanes.is_inline(task):
            self._run_inline([task])
        else:
            self._lanes.start(task)

    # --- running a job ------------------------------------------------------------------------

    def _run(self, task: Task) -> None:
        action = self._executor.execute(task)
        if action is not None and not self._commits.put([(task, action)]):
            self._executor.ended_after_abandon(task, None)

    def _run_inline(self, tasks: list[Task]) -> None:
        """Jobs without I/O, one after the other here; their steps queue together."""
        execute = self._executor.execute
        done = [(task, action) for task in tasks if (action := execute(task)) is not None]
        if done:
            self._commits.put(done)

    # --- settled -------------------------------------------------------------------------------

    def _finish(self, tasks: Sequence[Task], results: Sequence[Settled | None]) -> None:
        """The steps are settled (or given up): account for them and start what waited."""
        now = time.monotonic()
        for task, result in zip(tasks, results, strict=True):
            delivery = task.job.delivery
            outcome = _outcome(task.step, result)
            if self._metrics is not None:
                elapsed = now - (task.started_at or task.fetched_at)
                self._metrics.observe_delivery(delivery.topic, delivery.group, outcome, elapsed)
            if result is Settled.LOST:
                log.warning(
                    "delivery_lost",
                    topic=delivery.topic,
                    message_id=delivery.message.id,
                    **task.job.context,
                )
            elif result is None:  # not settled: the visibility timeout brings it back
                task.route.subscription.abandon([delivery])
            self._emit(
                "processed", topic=delivery.topic, message_id=delivery.message.id, outcome=outcome
            )
        roomier = {id(t.route): t.route for t in tasks}
        released: dict[int, Route] = {}
        with self._lock:
            for task in tasks:
                uncount(task)
                successor = self._partitions.release(task)
                if successor is not None:
                    successor.route.released.append(successor)
                    released[id(successor.route)] = successor.route
            for route in (roomier | released).values():
                route.room.notify_all()
        for route in released.values():  # its fetcher may be waiting for due work instead
            route.subscription.wake()

    # --- health ------------------------------------------------------------------------------

    def health(self, max_age_s: float) -> tuple[bool, str]:
        """Fetchers ticking and the commit thread alive. A slow lane is not unhealthy."""
        if (
            self._commit_thread is not None
            and not self._commit_thread.is_alive()
            and not self._commits.closed
        ):
            return False, "commit thread died"
        now = time.monotonic()
        stalled = [r.subscription.topic for r in self._routes if now - r.last_tick >= max_age_s]
        if stalled:
            return False, f"fetch loops stalled: {', '.join(stalled)}"
        return True, "ok"

    def problem(self, min_age_s: float = 2.0) -> str | None:
        """Why work cannot be done now, though it will be when the database lets it: hand-offs
        failing for at least ``min_age_s``, or a subscription's leases not renewed (the
        database is down, or refuses writes: a full disk). Everything is retried meanwhile:
        for /readyz, not /healthz."""
        failing = self._commits.failing(min_age_s)
        if failing is not None:
            return failing
        for route in self._routes:
            problem = route.subscription.problem()
            if problem is not None:
                return problem
        return None

    def lane_load(self) -> dict[str, tuple[int, int]]:
        """Running and waiting jobs per lane."""
        return self._lanes.load()

    # --- stopping -------------------------------------------------------------------------------

    def stop(self, grace_s: float) -> None:
        """Stop fetching, hand back what was not started, give running jobs ``grace_s``, and
        return within about ``grace_s`` plus a few seconds whatever the database does."""
        deadline = time.monotonic() + grace_s
        self._stopping.set()
        for route in self._routes:
            route.subscription.wake()
        with self._lock:
            for route in self._routes:
                route.room.notify_all()
        for thread in self._threads:
            if thread.name.startswith("fetch-"):
                thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._hand_back(self._not_started())
        self._wait_idle(deadline)
        with self._lock:
            running = [t for t in self._lanes.running() if not t.abandoned]
            for task in running:
                task.abandoned = "handed back"
        for task in running:
            log.warning(
                "handback_after_grace",
                topic=task.job.delivery.topic,
                message_id=task.job.delivery.message.id,
            )
        self._hand_back(running)
        self._wait_idle(deadline + _STOP_MARGIN_S, count_running=False)
        with self._lock:
            left = self._commits.close()
            self._lanes.close()
        if left:  # the database did not take them in time: the visibility timeout will
            log.warning("stop_left_unsettled", steps=len(left))
            for task in left:
                task.route.subscription.abandon([task.job.delivery])
        if self._commit_thread is not None:
            self._commit_thread.join(timeout=max(0.1, deadline + _STOP_MARGIN_S - time.monotonic()))

    def _not_started(self) -> list[Task]:
        with self._lock:
            tasks = self._lanes.take_waiting()
            for route in self._routes:
                tasks += route.released
                route.released = []
            tasks += self._partitions.drain()
        return tasks

    def _hand_back(self, tasks: Sequence[Task]) -> None:
        self._commits.put([(task, HandBack()) for task in tasks])

    def _wait_idle(self, deadline: float, *, count_running: bool = True) -> None:
        while time.monotonic() < deadline:
            with self._lock:
                busy = self._commits.busy()
                if count_running:
                    busy = busy or bool(self._lanes.running())
                if not busy:
                    return
            time.sleep(0.02)

    # --- reporting ---------------------------------------------------------------------------

    def _observe_lag(self, delivery: Delivery) -> None:
        if self._metrics is not None and delivery.due_at_ms and delivery.delivered_at_ms:
            lag_s = (delivery.delivered_at_ms - delivery.due_at_ms) / 1000
            self._metrics.observe_dispatch_lag(delivery.topic, delivery.group, lag_s)

    def _emit(self, event: str, **data: Any) -> None:
        if self._on_event is not None:
            self._on_event(event, **data)


def _outcome(step: Step | None, result: Settled | None) -> str:
    if result is Settled.LOST:
        return "lost"
    if result is None or step is None:
        return "unsettled"
    action = step.action
    if isinstance(action, Ack):
        return "ack"
    if isinstance(action, Nack):
        return "nack"
    if isinstance(action, Reject):
        return "reject"
    if isinstance(action, Defer):
        return "defer"
    return "handed_back"
