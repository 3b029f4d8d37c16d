"""Deliveries of one partition run one at a time, in the order they were claimed.

A task whose partition is busy waits behind the one that runs; once that one is settled, the
next is handed back to its fetcher (``Route.released``), which plans it again before it
starts. Every method is called with the worker's lock held.
"""

from __future__ import annotations

from collections import deque

from buildq.queue.worker.tasks import Task, count, uncount


class Partitions:
    def __init__(self) -> None:
        #: Busy partitions, each with the tasks waiting behind the one that runs.
        self._waiting: dict[tuple[str, str], deque[Task]] = {}

    def admit(self, task: Task) -> bool:
        """True if ``task`` may start now; otherwise it waits behind its predecessor (out of
        its fetcher's room meanwhile)."""
        waiting = self._waiting.get(task.partition)
        if waiting is not None:
            waiting.append(task)
            uncount(task)
            return False
        self._waiting[task.partition] = deque()
        return True

    def release(self, task: Task) -> Task | None:
        """``task`` is settled: the next task of its partition (back in its fetcher's room),
        or None when the partition is free."""
        waiting = self._waiting.get(task.partition)
        if waiting:
            successor = waiting.popleft()
            count(successor)
            return successor
        self._waiting.pop(task.partition, None)
        return None

    def drain(self) -> list[Task]:
        """Every task waiting behind its partition, taken out (to hand back on stop)."""
        tasks: list[Task] = []
        for waiting in self._waiting.values():
            tasks += waiting
            waiting.clear()
        return tasks
