"""An in-memory queue for tests: the whole contract, in one process, nothing on disk.

It keeps the semantics unit tests of handlers and of the worker rely on: idempotent publish by
``(topic, partition key, id)``, delays, consumer groups each with their own deliveries,
partition order for first deliveries, nack with backoff and a DLQ after ``max_attempts``,
reject, hand-back without a retry, fenced settles (``DeliveryLost`` for a claim that was
given up and delivered again), and batched settling through ``committer()``. It has one
member per group (no leases to share) and its clock is injectable.

Not for production: nothing survives the process. Tests of the SQL queue run on SQLite and
MariaDB; this is for fast tests of decisions, beside those.

Laid out as the SQL queue is: ``queue`` (the log, groups, claims and settles),
``subscription`` (a member and its deliveries), ``batch`` (the committer and transactions).
"""

from __future__ import annotations

from buildq.queue.memory.batch import (
    MemoryAckedStep,
    MemoryApply,
    MemoryCommitter,
    MemorySession,
    MemoryTransaction,
    run_effects,
)
from buildq.queue.memory.queue import MemoryQueue, wall_clock_ms
from buildq.queue.memory.subscription import MemoryDelivery, MemorySubscription

__all__ = [
    "MemoryAckedStep",
    "MemoryApply",
    "MemoryCommitter",
    "MemoryDelivery",
    "MemoryQueue",
    "MemorySession",
    "MemorySubscription",
    "MemoryTransaction",
    "run_effects",
    "wall_clock_ms",
]
