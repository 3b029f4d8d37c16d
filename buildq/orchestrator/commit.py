"""Group commit: the hand-offs of several deliveries in one database transaction.

Each worker still waits for its own delivery's step to commit before it takes the next one
(so a partition's steps stay in order), but steps that become ready at the same moment on
different workers share one transaction: one BEGIN/COMMIT and one connection checkout instead
of one each, which is where most of a step's cost went. If the shared transaction fails, each
step is run again on its own, so one bad step (a fenced ack, a bug) never takes the others
down with it, and each step keeps its own all-or-nothing hand-off.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog

from buildq.orchestrator.framework import Effect
from buildq.queue.contract import Delivery

log = structlog.get_logger("buildq.commit")

Step = tuple[Delivery, Effect | None]


@dataclass(eq=False)
class _Pending:
    delivery: Delivery
    effect: Effect | None
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class GroupCommitter:
    """A StepRunner (``committer(delivery, effect)``) that batches concurrent steps."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Step]], None],
        run_one: Callable[[Delivery, Effect | None], None],
        *,
        max_batch: int = 32,
    ) -> None:
        self._run_batch = run_batch
        self._run_one = run_one
        self._max_batch = max_batch
        self._inbox: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._closed = False
        self._closing = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="group-commit", daemon=True)
        self._thread.start()

    def __call__(self, delivery: Delivery, effect: Effect | None) -> None:
        pending = _Pending(delivery, effect)
        with self._closing:
            batching = not self._closed
            if batching:
                self._inbox.put(pending)
        if not batching:
            # A worker still finishing after close(): commit it here rather than wait forever.
            self._run_one(delivery, effect)
            return
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    @property
    def alive(self) -> bool:
        """False once the batching thread is gone while still open: workers would wait on it
        forever, so the daemon reports itself unhealthy and the watchdog restarts it."""
        return self._closed or self._thread.is_alive()

    def close(self) -> None:
        with self._closing:
            self._closed = True
            self._inbox.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            first = self._inbox.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    more = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._commit(batch)
                    return
                batch.append(more)
            self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        if len(batch) > 1:
            try:
                self._run_batch([(p.delivery, p.effect) for p in batch])
            except BaseException as err:  # one step spoiled the batch: each on its own, below
                log.debug("group_commit_split", size=len(batch), error=str(err)[:200])
            else:
                for pending in batch:
                    pending.done.set()
                return
        for pending in batch:
            try:
                self._run_one(pending.delivery, pending.effect)
            except BaseException as err:  # handed to the worker that waits for it
                pending.error = err
            pending.done.set()
