"""The worker: runs handlers over subscriptions so that no delivery waits on another's I/O.

    fetch (a thread per subscription) → plan (a batch at a time) → jobs in lanes → steps
    → commit (one transaction for every step that is ready)

- A handler *plans* a claimed batch into jobs, one per delivery (reading what the batch needs
  in one query, if it needs anything). A job names its **lane**: the I/O it waits on, such as
  one CI service. A lane runs at most ``concurrency`` jobs at once on threads of its own and
  keeps at most ``room`` more waiting; a job beyond that is deferred back to the queue without
  counting a retry. Jobs of the lane ``""`` do no I/O and run on the fetcher's thread.
- A job returns an effect (or None): the writes to commit with its ack. A finished job is a
  step; the commit thread settles every step that is ready in one ``Committer.commit`` call.
  A batch that fails transiently is tried again (the claims stay alive meanwhile); one that
  fails otherwise is split, so a bad step never sinks the rest.
- Deliveries of one partition run one at a time, in the order they were claimed.
- A fetcher waits only for its own room (deliveries it claimed that are being planned, run
  inline or committed). Deliveries in or waiting for a lane are the lane's, so a slow lane
  slows its own jobs, and nothing else.
- The subscription keeps the claim of every delivery it handed out alive until it is
  settled, however long its job waits or runs; a job whose claim is lost meanwhile does not
  start, and its step is dropped.

On stop, fetching ends, jobs not started are handed back without counting a retry, running
ones get the grace period, and whatever could not be settled by then is left to the
visibility timeout: the wait is bounded whatever the database does.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from buildq.queue.contract import (
    Ack,
    Action,
    Committer,
    Defer,
    Delivery,
    Effect,
    HandBack,
    InvalidMessage,
    Nack,
    Reject,
    Settled,
    Step,
    Subscription,
    TransientQueueError,
)

log = structlog.get_logger("buildq.worker")

#: The lane of jobs that do no I/O: they run on the fetcher's thread.
INLINE = ""
_IDLE_TICK_S = 0.5
_COMMIT_BACKOFF_MAX_S = 5.0
#: A batch whose plan could not read what it needs is deferred this long (no retry counted).
_REPLAN_AFTER_MS = 1_000
#: After the grace period, how long stop() still gives the commit thread to hand back.
_STOP_MARGIN_S = 3.0


class Retry(Exception):
    """Try this delivery again later: a failure (it counts; the DLQ after max_attempts)."""

    def __init__(self, reason: str, delay_ms: int | None = None) -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


class Unprocessable(Exception):
    """This message can never be processed: send it to the DLQ with the reason."""


class Postpone(Exception):
    """Not now, and not a failure: deliver again after ``delay_ms`` without counting a retry."""

    def __init__(self, reason: str, delay_ms: int) -> None:
        super().__init__(reason)
        self.delay_ms = delay_ms


@dataclass(frozen=True, slots=True)
class Job:
    """The work for one delivery: ``run`` may block on its lane's I/O and returns the effect
    to commit with the ack, or raises (Retry, Unprocessable, Postpone, or what the worker's
    classifier knows)."""

    delivery: Delivery
    run: Callable[[], Effect | None]
    lane: str = INLINE
    #: Added to the worker's log lines about this delivery (e.g. the build it is about).
    context: Mapping[str, str] = field(default_factory=dict)


class Handler(Protocol):
    """Plans the deliveries of one topic."""

    #: The topic it consumes.
    topic: str
    #: Confirm the claim right before the job runs unless it is fresh: for a step that must
    #: not run twice (a trigger) after a wait long enough for the claim to have moved on.
    renew_claim_first: bool
    #: A failure is retried (with backoff) instead of dead-lettered: for a dead-letter
    #: consumer, which has nowhere further to send a message.
    never_dead_letter: bool

    def plan(self, deliveries: Sequence[Delivery]) -> Sequence[Job]:
        """One job per delivery, in order. Must not raise for one bad delivery: give it a job
        that raises instead."""
        ...


#: Maps an error a job raised to what to do with its delivery (None: the default handling).
Classifier = Callable[[BaseException], Action | None]
EventHook = Callable[..., None]


@dataclass(frozen=True, slots=True)
class LaneSettings:
    """How much of one kind of I/O runs at once."""

    #: Jobs running at once (threads); 0 runs them on the fetcher's thread (no I/O).
    concurrency: int = 16
    #: Jobs waiting beyond those running; more are deferred back to the queue.
    room: int = 1_000
    #: A job still running after this long is given up: its delivery is nacked (a failure)
    #: and its thread's slot stays taken until the call returns. None: no limit.
    call_timeout_s: float | None = 300.0
    #: How long a delivery deferred for want of room waits before it is delivered again.
    defer_ms: int = 2_000


class WorkerMetrics(Protocol):
    """What the worker reports (buildq.metrics.Metrics); labels are topic/group and lane."""

    def observe_delivery(self, topic: str, group: str, outcome: str, seconds: float) -> None: ...
    def observe_dispatch_lag(self, topic: str, group: str, seconds: float) -> None: ...
    def observe_lane_wait(self, lane: str, seconds: float) -> None: ...
    def set_lane_load(self, lane: str, running: int, waiting: int, oldest_s: float) -> None:
        """Jobs running and waiting in ``lane``, and how long its oldest job has been waiting
        on it (queued or running): a CI service that stopped answering shows here."""
        ...

    def observe_commit(self, steps: int, seconds: float) -> None: ...
    def observe_commit_failure(self) -> None:
        """A batch the database could not take now (down, deadlocked, disk full)."""
        ...


@dataclass(eq=False)
class _Route:
    handler: Handler
    subscription: Subscription
    #: Claimed by this fetcher and not in a lane nor behind its partition: its room.
    moving: int = 0
    released: list[_Task] = field(default_factory=list)
    room: threading.Condition | None = None
    last_tick: float = field(default_factory=time.monotonic)


@dataclass(eq=False, slots=True)
class _Task:
    route: _Route
    job: Job
    fetched_at: float
    queued_at: float = 0.0
    started_at: float = 0.0
    #: Counted in its fetcher's room (``_Route.moving``): claimed and not waiting in or for
    #: a lane, nor behind its partition.
    counted: bool = True
    #: Why it was given up ("timed out", "handed back"): what its job returns later is ignored.
    abandoned: str = ""
    step: Step | None = None

    @property
    def partition(self) -> tuple[str, str]:
        delivery = self.job.delivery
        return delivery.topic, delivery.message.partition_key


@dataclass(eq=False)
class _Lane:
    name: str
    settings: LaneSettings
    ready: threading.Condition
    waiting: deque[_Task] = field(default_factory=deque)
    running: set[_Task] = field(default_factory=set)
    threads: int = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)


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
        self._committer = committer
        self._classify = classify
        self._metrics = metrics
        self._on_event = on_event
        self._max_commit_batch = max_commit_batch
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._routes: list[_Route] = []
        self._lanes = {
            name: _Lane(name, settings, threading.Condition(self._lock))
            for name, settings in (lanes or {}).items()
            if settings.concurrency > 0
        }
        self._inline = {INLINE} | {n for n, s in (lanes or {}).items() if s.concurrency <= 0}
        self._partitions: dict[tuple[str, str], deque[_Task]] = {}
        self._inbox: deque[_Task] = deque()
        self._inbox_ready = threading.Condition(self._lock)
        self._committing: list[_Task] = []  # the batch the commit thread holds
        #: Since when (monotonic) and why commits fail transiently; None while they succeed.
        self._commit_failing: tuple[float, str] | None = None
        self._threads: list[threading.Thread] = []
        self._commit_thread: threading.Thread | None = None
        self._closed = False

    def add(self, handler: Handler, subscription: Subscription) -> None:
        if handler.topic != subscription.topic:
            raise ValueError(
                f"handler of {handler.topic!r} on a subscription of {subscription.topic!r}"
            )
        self._routes.append(_Route(handler, subscription, room=threading.Condition(self._lock)))

    def start(self) -> None:
        self._commit_thread = self._spawn("commit", self._commit_loop)
        self._spawn("worker-watch", self._watch_loop)
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

    def _fetch_loop(self, route: _Route) -> None:
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
                log.warning("fetch_failed", topic=subscription.topic, error=_describe(err)[:300])
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

    def _wait_for_room(self, route: _Route, limit: int, idle_s: float) -> int:
        """Wait until at least half the fetcher's room is free: refilling it one delivery at a
        time would cost a claim transaction per delivery."""
        assert route.room is not None
        with self._lock:
            if route.moving > limit // 2 and not route.released and not self._stopping.is_set():
                route.room.wait(max(idle_s, 0.05))
            return limit - route.moving

    def _dispatch(self, route: _Route, deliveries: Sequence[Delivery]) -> None:
        fetched_at = time.monotonic()
        with self._lock:
            route.moving += len(deliveries)
        for delivery in deliveries:
            self._observe_lag(delivery)
        tasks = [_Task(route, job, fetched_at) for job in self._plan(route, deliveries)]
        ready = self._admit(tasks)
        self._run_inline([t for t in ready if t.job.lane in self._inline])
        for task in ready:
            if task.job.lane not in self._inline:
                self._start(task)

    def _plan(self, route: _Route, deliveries: Sequence[Delivery]) -> Sequence[Job]:
        try:
            jobs = route.handler.plan(deliveries)
            if len(jobs) != len(deliveries):
                raise RuntimeError(f"plan returned {len(jobs)} jobs for {len(deliveries)}")
            return jobs
        except TransientQueueError as err:  # its read failed: nobody's failure, try later
            log.warning("plan_failed", topic=route.subscription.topic, error=_describe(err))
            later = Postpone(f"planning failed: {_describe(err)}", _REPLAN_AFTER_MS)
            return [Job(d, _raiser(later)) for d in deliveries]
        except Exception as err:  # a bug in plan: each delivery fails on its own
            log.exception("plan_failed", topic=route.subscription.topic)
            return [Job(d, _raiser(err)) for d in deliveries]

    def _admit(self, tasks: list[_Task]) -> list[_Task]:
        """The tasks that may start now; each one whose partition is busy waits behind its
        predecessor instead."""
        ready = []
        with self._lock:
            for task in tasks:
                waiting = self._partitions.get(task.partition)
                if waiting is not None:
                    waiting.append(task)
                    _uncount(task)
                else:
                    self._partitions[task.partition] = deque()
                    ready.append(task)
        return ready

    def _start_released(self, route: _Route) -> None:
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

    def _start(self, task: _Task) -> None:
        if task.job.lane in self._inline:
            self._run_inline([task])
            return
        lane = self._lane(task.job.lane)
        with self._lock:
            if lane.load >= lane.settings.concurrency + lane.settings.room:
                deferred = True
            else:
                deferred = False
                _uncount(task)
                task.queued_at = time.monotonic()
                lane.waiting.append(task)
                lane.ready.notify()
                # Every thread not running a job takes one waiting job: start one more while
                # there are more waiting jobs than such threads.
                idle = lane.threads - len(lane.running)
                if len(lane.waiting) > idle and lane.threads < lane.settings.concurrency:
                    lane.threads += 1
                    self._spawn(f"lane-{lane.name}", self._lane_loop, lane)
        if deferred:
            log.info("lane_full", lane=lane.name, message_id=task.job.delivery.message.id)
            self._to_commit([(task, Defer(lane.settings.defer_ms))])

    # --- lanes -----------------------------------------------------------------------------

    def _lane(self, name: str) -> _Lane:
        """The lane called ``name``; one not configured gets the default settings."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = _Lane(
                    name, LaneSettings(), threading.Condition(self._lock)
                )
            return lane

    def _lane_loop(self, lane: _Lane) -> None:
        while True:
            with self._lock:
                while not lane.waiting and not self._closed:
                    lane.ready.wait()
                if not lane.waiting:
                    lane.threads -= 1
                    return
                task = lane.waiting.popleft()
                lane.running.add(task)
            if self._metrics is not None:
                self._metrics.observe_lane_wait(lane.name, time.monotonic() - task.queued_at)
            try:
                self._run(task)
            finally:
                with self._lock:
                    lane.running.discard(task)

    # --- running a job ------------------------------------------------------------------------

    def _run(self, task: _Task) -> None:
        action = self._execute(task)
        if action is not None and not self._to_commit([(task, action)]):
            self._ended_after_abandon(task, None)

    def _run_inline(self, tasks: list[_Task]) -> None:
        """Jobs without I/O, one after the other here; their steps queue together."""
        done = [(task, action) for task in tasks if (action := self._execute(task)) is not None]
        if done:
            self._to_commit(done)

    def _execute(self, task: _Task) -> Action | None:
        """Run the task's job: what to do with its delivery (None: nothing, it is gone)."""
        delivery = task.job.delivery
        if delivery.lost or not self._claim_confirmed(task):
            self._emit("delivery_expired_before_start", topic=delivery.topic)
            self._finish([task], [Settled.LOST])
            return None
        task.started_at = time.monotonic()
        try:
            return Ack(task.job.run())
        except Exception as err:
            if task.abandoned:  # a failure of work given up on is nobody's failure
                self._ended_after_abandon(task, err)
                return None
            return self._action_for(task, err)

    def _ended_after_abandon(self, task: _Task, err: Exception | None) -> None:
        delivery = task.job.delivery
        log.info(
            "handed_back_delivery_ended" if task.abandoned == "handed back" else "late_call_ended",
            topic=delivery.topic,
            message_id=delivery.message.id,
            failed=err is not None,
            **task.job.context,
        )

    def _claim_confirmed(self, task: _Task) -> bool:
        """For a handler that renews first: make sure a claim that is no longer fresh is
        still ours right now (one statement; a fresh claim needs none)."""
        route, delivery = task.route, task.job.delivery
        timeout_ms = route.subscription.settings.visibility_timeout_ms
        fresh = time.monotonic() - task.fetched_at < timeout_ms / 4000
        if not route.handler.renew_claim_first or fresh:
            return True
        try:
            delivery.extend_visibility(timeout_ms)
        except TransientQueueError as err:  # the database is struggling: run as fetched
            log.warning("claim_renewal_failed", error=_describe(err)[:300])
        except Exception as err:  # DeliveryLost: someone else has it now
            log.warning(
                "delivery_expired_before_start",
                message_id=delivery.message.id,
                error=str(err)[:200],
            )
            return False
        return True

    def _action_for(self, task: _Task, err: BaseException) -> Action:
        delivery = task.job.delivery
        about = {"topic": delivery.topic, "message_id": delivery.message.id, **task.job.context}
        action = self._classify(err) if self._classify is not None else None
        if action is None:
            action = _default_action(err)
        if action is None:
            log.error("handler_failed", exc_info=err, **about)
            action = Reject(f"unexpected error: {_describe(err)}")
        if isinstance(action, Reject) and task.route.handler.never_dead_letter:
            action = Nack(None, action.reason)
        if isinstance(action, Nack):
            log.warning(
                "delivery_nacked", error=action.error, retry_count=delivery.retry_count, **about
            )
        elif isinstance(action, Reject):
            log.warning(
                "delivery_rejected", error=action.reason, retry_count=delivery.retry_count, **about
            )
        return action

    # --- committing -----------------------------------------------------------------------------

    def _to_commit(self, done: list[tuple[_Task, Action]]) -> bool:
        """Queue these tasks' steps; False if one already had a step (it was given up
        meanwhile: its step stands, this one is dropped)."""
        queued = True
        with self._lock:
            for task, action in done:
                if task.step is not None:
                    queued = False
                    continue
                task.step = Step(task.job.delivery, action)
                _count(task)
                self._inbox.append(task)
            self._inbox_ready.notify()
        return queued

    def _commit_loop(self) -> None:
        delay = 0.0
        while True:
            with self._lock:
                while not self._inbox and not self._closed:
                    self._inbox_ready.wait()
                if not self._inbox:
                    return
                count = min(len(self._inbox), self._max_commit_batch)
                batch = [self._inbox.popleft() for _ in range(count)]
                self._committing = batch
            retry = self._commit(batch)
            with self._lock:
                self._committing = []
                if retry and self._closed:  # stop() gave these up: the timeout brings them back
                    return
                if retry:
                    self._inbox.extendleft(reversed(retry))
            if retry:
                # The database is down or the disk full: nothing is lost while we wait (the
                # claims are kept alive where the database still allows it), and nothing is
                # counted as a failure.
                delay = min(_COMMIT_BACKOFF_MAX_S, max(0.05, delay * 2))
                time.sleep(delay)
            else:
                delay = 0.0

    def _commit(self, batch: list[_Task]) -> list[_Task]:
        """Settle ``batch``; what the database could not take now is returned to try again."""
        started = time.monotonic()
        try:
            results = self._committer.commit([t.step for t in batch if t.step is not None])
        except TransientQueueError as err:
            error = _describe(err)[:300]
            if self._commit_failing is None:  # said once when it starts, not on every retry
                log.warning("commit_failed", steps=len(batch), error=error)
                self._commit_failing = (time.monotonic(), error)
            if self._metrics is not None:
                self._metrics.observe_commit_failure()
            return batch
        except Exception as err:
            if len(batch) == 1:
                return self._commit_failed_alone(batch[0], err)
            log.info("commit_split", steps=len(batch), error=_describe(err)[:200])
            retry: list[_Task] = []
            for task in batch:
                retry += self._commit([task])
            return retry
        if self._commit_failing is not None:
            log.info(
                "commit_recovered", failed_s=round(time.monotonic() - self._commit_failing[0], 1)
            )
            self._commit_failing = None
        if self._metrics is not None:
            self._metrics.observe_commit(len(batch), time.monotonic() - started)
        self._finish(batch, results)
        return []

    def _commit_failed_alone(self, task: _Task, err: BaseException) -> list[_Task]:
        """One step the database refused: an ack becomes a failure of its own; a failure that
        cannot be written either is left to the visibility timeout."""
        assert task.step is not None
        if isinstance(task.step.action, Ack):
            task.step = Step(task.step.delivery, self._action_for(task, err))
            return self._commit([task])
        log.error(
            "settle_failed", message_id=task.job.delivery.message.id, error=_describe(err)[:300]
        )
        self._finish([task], [None])
        return []

    def _finish(self, tasks: Sequence[_Task], results: Sequence[Settled | None]) -> None:
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
        released: dict[int, _Route] = {}
        with self._lock:
            for task in tasks:
                _uncount(task)
                waiting = self._partitions.get(task.partition)
                if waiting:
                    successor = waiting.popleft()
                    _count(successor)
                    successor.route.released.append(successor)
                    released[id(successor.route)] = successor.route
                else:
                    self._partitions.pop(task.partition, None)
            for route in (roomier | released).values():
                assert route.room is not None
                route.room.notify_all()
        for route in released.values():  # its fetcher may be waiting for due work instead
            route.subscription.wake()

    # --- watching -----------------------------------------------------------------------------

    def _watch_loop(self) -> None:
        """Give up calls past their lane's timeout; report lane load."""
        while not self._stopping.wait(_IDLE_TICK_S):
            now = time.monotonic()
            overdue: list[tuple[_Task, _Lane]] = []
            with self._lock:
                loads = [
                    (lane.name, len(lane.running), len(lane.waiting), _oldest(lane, now))
                    for lane in self._lanes.values()
                ]
                for lane in self._lanes.values():
                    limit = lane.settings.call_timeout_s
                    if limit is None:
                        continue
                    for task in lane.running:
                        if not task.abandoned and task.started_at and now - task.started_at > limit:
                            task.abandoned = "timed out"
                            overdue.append((task, lane))
            for task, lane in overdue:
                error = (
                    f"the call did not return within its lane's call_timeout_s="
                    f"{lane.settings.call_timeout_s:g} (lane {lane.name!r})"
                )
                if self._to_commit([(task, Nack(None, error))]):
                    log.warning(
                        "call_timed_out", lane=lane.name, message_id=task.job.delivery.message.id
                    )
            if self._metrics is not None:
                for name, running, waiting, oldest_s in loads:
                    self._metrics.set_lane_load(name, running, waiting, oldest_s)

    def health(self, max_age_s: float) -> tuple[bool, str]:
        """Fetchers ticking and the commit thread alive. A slow lane is not unhealthy."""
        if (
            self._commit_thread is not None
            and not self._commit_thread.is_alive()
            and not self._closed
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
        failing = self._commit_failing
        if failing is not None and time.monotonic() - failing[0] >= min_age_s:
            return f"hand-offs failing for {time.monotonic() - failing[0]:.0f}s: {failing[1]}"
        for route in self._routes:
            problem = route.subscription.problem()
            if problem is not None:
                return problem
        return None

    def lane_load(self) -> dict[str, tuple[int, int]]:
        """Running and waiting jobs per lane."""
        with self._lock:
            return {n: (len(lane.running), len(lane.waiting)) for n, lane in self._lanes.items()}

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
                assert route.room is not None
                route.room.notify_all()
        for thread in self._threads:
            if thread.name.startswith("fetch-"):
                thread.join(timeout=max(0.1, deadline - time.monotonic()))
        self._hand_back(self._not_started())
        self._wait_idle(deadline)
        with self._lock:
            running = [t for lane in self._lanes.values() for t in lane.running if not t.abandoned]
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
            self._closed = True
            self._inbox_ready.notify_all()
            for lane in self._lanes.values():
                lane.ready.notify_all()
            left = list(self._inbox) + self._committing
            self._inbox.clear()
        if left:  # the database did not take them in time: the visibility timeout will
            log.warning("stop_left_unsettled", steps=len(left))
            for task in left:
                task.route.subscription.abandon([task.job.delivery])
        if self._commit_thread is not None:
            self._commit_thread.join(timeout=max(0.1, deadline + _STOP_MARGIN_S - time.monotonic()))

    def _not_started(self) -> list[_Task]:
        with self._lock:
            tasks = [t for lane in self._lanes.values() for t in lane.waiting]
            for lane in self._lanes.values():
                lane.waiting.clear()
            for route in self._routes:
                tasks += route.released
                route.released = []
            for waiting in self._partitions.values():
                tasks += waiting
                waiting.clear()
        return tasks

    def _hand_back(self, tasks: Sequence[_Task]) -> None:
        self._to_commit([(task, HandBack()) for task in tasks])

    def _wait_idle(self, deadline: float, *, count_running: bool = True) -> None:
        while time.monotonic() < deadline:
            with self._lock:
                busy = bool(self._inbox) or bool(self._committing)
                if count_running:
                    busy = busy or any(lane.running for lane in self._lanes.values())
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


def _oldest(lane: _Lane, now: float) -> float:
    """Seconds since the oldest job of ``lane`` was queued (0 when it has none)."""
    queued = [t.queued_at for t in lane.running] + [t.queued_at for t in lane.waiting]
    return now - min(queued) if queued else 0.0


def _count(task: _Task) -> None:
    if not task.counted:
        task.counted = True
        task.route.moving += 1


def _uncount(task: _Task) -> None:
    if task.counted:
        task.counted = False
        task.route.moving -= 1


def _raiser(err: BaseException) -> Callable[[], Effect | None]:
    def run() -> Effect | None:
        raise err

    return run


def _default_action(err: BaseException) -> Action | None:
    if isinstance(err, Retry):
        return Nack(err.delay_ms, _describe(err))
    if isinstance(err, Postpone):
        return Defer(err.delay_ms)
    if isinstance(err, TransientQueueError):
        return Nack(None, _describe(err))
    if isinstance(err, Unprocessable | InvalidMessage):
        return Reject(_describe(err))
    return None


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


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:2000]
