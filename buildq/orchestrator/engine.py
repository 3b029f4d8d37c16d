"""The daemon's engine: the queue's worker running the orchestrator's handlers.

- ``BuildCommitter``: the queue's batch committer with the build store writing in the same
  transaction (``SqlBuildStore.apply``); the builds a batch finished are counted in the metrics
  once it has committed, so a batch that rolls back and runs again counts them once.
- ``classify``: what a runner's errors mean for a delivery (a transient CI error is a retry; a
  malformed payload can never succeed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from buildq.buildrunner import MalformedPayload, RunnerThrottled, TransientRunnerError
from buildq.orchestrator.model import FinishedBuild
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.contract import Action, Defer, Nack, Reject, Settled, Step
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.batch import AckedStep, SqlSession


class BuildCommitter:
    """A ``Committer`` whose batches write the build rows too (see the module docstring)."""

    def __init__(
        self,
        queue: SqlQueue,
        store: SqlBuildStore,
        on_finished: Callable[[FinishedBuild], None],
    ) -> None:
        self._store = store
        self._on_finished = on_finished
        self._inner = queue.committer(self._apply)
        self._lock = threading.Lock()
        self._finished: list[FinishedBuild] = []

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        with self._lock:
            self._finished = []
            results = self._inner.commit(steps)
            finished, self._finished = self._finished, []
        for build in finished:
            self._on_finished(build)
        return results

    def _apply(self, session: SqlSession, steps: Sequence[AckedStep]) -> None:
        # Runs again when the queue redoes the transaction: the last run's list is the one.
        self._finished = self._store.apply(session, steps)


def classify(err: BaseException) -> Action | None:
    """Runner errors, for the worker (None: the worker's default handling)."""
    text = f"{type(err).__name__}: {err}"[:2000]
    if isinstance(err, RunnerThrottled):
        return Defer(max(1, int(err.retry_in_s * 1000)))
    if isinstance(err, TransientRunnerError):
        return Nack(None, text)
    if isinstance(err, MalformedPayload):
        return Reject(text)
    return None
