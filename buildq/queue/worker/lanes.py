"""Lanes: how much of one kind of I/O runs at once.

A job names its lane, the I/O it waits on (such as one CI service). A lane runs at most
``concurrency`` jobs at once on threads of its own, started as jobs come and ended when the
worker closes, and keeps at most ``room`` more waiting; a job beyond that is deferred back to
the queue without counting a retry. A lane whose I/O hangs fills up; nothing else waits on it.
A job still running after its lane's ``call_timeout_s`` is given up: its delivery is nacked.
Lanes configured with concurrency 0, and the lane ``""``, run their jobs on the fetcher's
thread (the worker does that, not this module).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from buildq.queue.contract import Action, Defer, Nack
from buildq.queue.worker.contract import INLINE, LaneSettings, WorkerMetrics
from buildq.queue.worker.tasks import Task, uncount

log = structlog.get_logger("buildq.worker")

_IDLE_TICK_S = 0.5

#: Queues steps to commit; False if a task already had one (see ``Commits.put``).
Settle = Callable[[list[tuple[Task, Action]]], bool]


@dataclass(eq=False)
class Lane:
    name: str
    settings: LaneSettings
    ready: threading.Condition
    waiting: deque[Task] = field(default_factory=deque)
    running: set[Task] = field(default_factory=set)
    threads: int = 0

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.running)


class Lanes:
    """The worker's lanes; they share the worker's lock."""

    def __init__(
        self,
        lock: threading.Lock,
        settings: Mapping[str, LaneSettings],
        *,
        run: Callable[[Task], None],
        settle: Settle,
        metrics: WorkerMetrics | None,
    ) -> None:
        self._lock = lock
        self._run = run
        self._settle = settle
        self._metrics = metrics
        self._lanes = {
            name: Lane(name, lane, threading.Condition(lock))
            for name, lane in settings.items()
            if lane.concurrency > 0
        }
        self._inline = {INLINE} | {n for n, s in settings.items() if s.concurrency <= 0}
        self._closed = False

    def is_inline(self, task: Task) -> bool:
        """The task's job runs on the fetcher's thread (its lane does no I/O)."""
        return task.job.lane in self._inline

    def start(self, task: Task) -> None:
        """Queue ``task`` on its lane, or defer it back to the queue if the lane is full."""
        lane = self._lane(task.job.lane)
        with self._lock:
            if lane.load >= lane.settings.concurrency + lane.settings.room:
                deferred = True
            else:
                deferred = False
                uncount(task)
                task.queued_at = time.monotonic()
                lane.waiting.append(task)
                lane.ready.notify()
                # Every thread not running a job takes one waiting job: start one more while
                # there are more waiting jobs than such threads.
                idle = lane.threads - len(lane.running)
                if len(lane.waiting) > idle and lane.threads < lane.settings.concurrency:
                    lane.threads += 1
                    threading.Thread(
                        target=self._loop, args=(lane,), name=f"lane-{lane.name}", daemon=True
                    ).start()
        if deferred:
            log.info("lane_full", lane=lane.name, message_id=task.job.delivery.message.id)
            self._settle([(task, Defer(lane.settings.defer_ms))])

    def _lane(self, name: str) -> Lane:
        """The lane called ``name``; one not configured gets the default settings."""
        with self._lock:
            lane = self._lanes.get(name)
            if lane is None:
                lane = self._lanes[name] = Lane(
                    name, LaneSettings(), threading.Condition(self._lock)
                )
            return lane

    def _loop(self, lane: Lane) -> None:
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

    def watch(self, stopping: threading.Event) -> None:
        """Give up calls past their lane's timeout; report lane load. Until ``stopping``."""
        while not stopping.wait(_IDLE_TICK_S):
            now = time.monotonic()
            overdue: list[tuple[Task, Lane]] = []
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
                if self._settle([(task, Nack(None, error))]):
                    log.warning(
                        "call_timed_out", lane=lane.name, message_id=task.job.delivery.message.id
                    )
            if self._metrics is not None:
                for name, running, waiting, oldest_s in loads:
                    self._metrics.set_lane_load(name, running, waiting, oldest_s)

    def load(self) -> dict[str, tuple[int, int]]:
        """Running and waiting jobs per lane."""
        with self._lock:
            return {n: (len(lane.running), len(lane.waiting)) for n, lane in self._lanes.items()}

    # --- stopping (the caller holds the lock) ---------------------------------------------

    def take_waiting(self) -> list[Task]:
        """The tasks waiting for a thread, taken out of their lanes."""
        tasks = [t for lane in self._lanes.values() for t in lane.waiting]
        for lane in self._lanes.values():
            lane.waiting.clear()
        return tasks

    def running(self) -> list[Task]:
        return [t for lane in self._lanes.values() for t in lane.running]

    def close(self) -> None:
        """Let the lanes' threads end once nothing waits."""
        self._closed = True
        for lane in self._lanes.values():
            lane.ready.notify_all()


def _oldest(lane: Lane, now: float) -> float:
    """Seconds since the oldest job of ``lane`` was queued (0 when it has none)."""
    queued = [t.queued_at for t in lane.running] + [t.queued_at for t in lane.waiting]
    return now - min(queued) if queued else 0.0
