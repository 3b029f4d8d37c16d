"""The commit thread: settles every step that is ready in one ``Committer.commit`` call.

A finished job is a step (its delivery and what to do with it). The thread takes every step
that is queued, up to a batch, and commits them together. A batch the database cannot take now
(down, deadlocked, disk full) is tried again with back-off: nothing is lost meanwhile (the
claims are kept alive where the database still allows it), and nothing counts as a failure of
the messages. A batch that fails otherwise is split, so a bad step never sinks the rest.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

import structlog

from buildq.queue.contract import Ack, Action, Committer, Step, TransientQueueError
from buildq.queue.worker.contract import WorkerMetrics
from buildq.queue.worker.tasks import Finish, Task, count, describe

log = structlog.get_logger("buildq.worker")

_COMMIT_BACKOFF_MAX_S = 5.0

#: What an error means for a task's delivery (the worker's classification).
ActionFor = Callable[[Task, BaseException], Action]


class Commits:
    """The queue of steps to commit and the thread that commits them; it shares the worker's
    lock."""

    def __init__(
        self,
        committer: Committer,
        lock: threading.Lock,
        *,
        max_batch: int,
        metrics: WorkerMetrics | None,
        action_for: ActionFor,
        finish: Finish,
    ) -> None:
        self._committer = committer
        self._lock = lock
        self._max_batch = max_batch
        self._metrics = metrics
        self._action_for = action_for
        self._finish = finish
        self._inbox: deque[Task] = deque()
        self._inbox_ready = threading.Condition(lock)
        self._committing: list[Task] = []  # the batch the commit thread holds
        #: Since when (monotonic) and why commits fail transiently; None while they succeed.
        self._failing: tuple[float, str] | None = None
        self.closed = False

    def put(self, done: list[tuple[Task, Action]]) -> bool:
        """Queue these tasks' steps; False if one already had a step (it was given up
        meanwhile: its step stands, this one is dropped)."""
        queued = True
        with self._lock:
            for task, action in done:
                if task.step is not None:
                    queued = False
                    continue
                task.step = Step(task.job.delivery, action)
                count(task)
                self._inbox.append(task)
            self._inbox_ready.notify()
        return queued

    def run(self) -> None:
        """The commit thread: until ``close`` and nothing is left to commit."""
        delay = 0.0
        while True:
            with self._lock:
                while not self._inbox and not self.closed:
                    self._inbox_ready.wait()
                if not self._inbox:
                    return
                size = min(len(self._inbox), self._max_batch)
                batch = [self._inbox.popleft() for _ in range(size)]
                self._committing = batch
            retry = self._commit(batch)
            with self._lock:
                self._committing = []
                if retry and self.closed:  # stop() gave these up: the timeout brings them back
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

    def _commit(self, batch: list[Task]) -> list[Task]:
        """Settle ``batch``; what the database could not take now is returned to try again."""
        started = time.monotonic()
        try:
            results = self._committer.commit([t.step for t in batch if t.step is not None])
        except TransientQueueError as err:
            error = describe(err)[:300]
            if self._failing is None:  # said once when it starts, not on every retry
                log.warning("commit_failed", steps=len(batch), error=error)
                self._failing = (time.monotonic(), error)
            if self._metrics is not None:
                self._metrics.observe_commit_failure()
            return batch
        except Exception as err:
            if len(batch) == 1:
                return self._commit_failed_alone(batch[0], err)
            log.info("commit_split", steps=len(batch), error=describe(err)[:200])
            retry: list[Task] = []
            for task in batch:
                retry += self._commit([task])
            return retry
        if self._failing is not None:
            log.info("commit_recovered", failed_s=round(time.monotonic() - self._failing[0], 1))
            self._failing = None
        if self._metrics is not None:
            self._metrics.observe_commit(len(batch), time.monotonic() - started)
        self._finish(batch, results)
        return []

    def _commit_failed_alone(self, task: Task, err: BaseException) -> list[Task]:
        """One step the database refused: an ack becomes a failure of its own; a failure that
        cannot be written either is left to the visibility timeout."""
        assert task.step is not None
        if isinstance(task.step.action, Ack):
            task.step = Step(task.step.delivery, self._action_for(task, err))
            return self._commit([task])
        log.error(
            "settle_failed", message_id=task.job.delivery.message.id, error=describe(err)[:300]
        )
        self._finish([task], [None])
        return []

    def failing(self, min_age_s: float) -> str | None:
        """Why hand-offs fail, once they have failed for at least ``min_age_s``."""
        failing = self._failing
        if failing is not None and time.monotonic() - failing[0] >= min_age_s:
            return f"hand-offs failing for {time.monotonic() - failing[0]:.0f}s: {failing[1]}"
        return None

    # --- stopping (the caller holds the lock) ---------------------------------------------

    def busy(self) -> bool:
        return bool(self._inbox) or bool(self._committing)

    def close(self) -> list[Task]:
        """Let the thread end; the tasks it has not committed, taken out."""
        self.closed = True
        self._inbox_ready.notify_all()
        left = list(self._inbox) + self._committing
        self._inbox.clear()
        return left
