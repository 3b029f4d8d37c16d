"""Small doubles for the unit tests: a manual clock, the worker's event hook recorded, a handler
built from a function, a committer that counts (and can fail or hold), and a subscription that
hands out scripted deliveries (several of one partition at once, as the SQL queue may)."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from buildq.queue.contract import (
    Committer,
    DeadLetter,
    Delivery,
    Effect,
    Message,
    Settled,
    Step,
    TransientQueueError,
)
from buildq.queue.memory import MemoryDelivery, MemoryQueue
from buildq.queue.settings import Backoff, SubscriptionSettings
from buildq.queue.worker import INLINE, Job, Worker
from tests.support.waiting import wait_until

#: A wait in a job that a test releases; long enough never to end first on a loaded machine.
BLOCK_S = 30.0
#: Subscriptions that notice a clock step quickly; no jitter, so delays are exact.
FAST = SubscriptionSettings(
    poll_interval_ms=20, backoff=Backoff(initial_ms=1_000, multiplier=2.0, jitter=0.0)
)


class ManualClock:
    """Epoch milliseconds that move only when a test says so."""

    def __init__(self, start_ms: int = 1_700_000_000_000) -> None:
        self._now = start_ms
        self._lock = threading.Lock()

    def __call__(self) -> int:
        with self._lock:
            return self._now

    def advance(self, ms: int) -> int:
        with self._lock:
            self._now += ms
            return self._now

    def seconds(self) -> float:
        """For runners whose clock is epoch seconds."""
        return self() / 1000


class Events:
    """The worker's ``on_event`` hook, recorded."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, event: str, **data: Any) -> None:
        with self._lock:
            self.seen.append((event, data))

    def processed(self, topic: str | None = None) -> list[tuple[str, str]]:
        """(message id, outcome) of every processed delivery, in order."""
        with self._lock:
            return [
                (data["message_id"], data["outcome"])
                for event, data in self.seen
                if event == "processed" and (topic is None or data["topic"] == topic)
            ]

    def outcomes(self, message_id: str, topic: str | None = None) -> list[str]:
        return [outcome for mid, outcome in self.processed(topic) if mid == message_id]

    def wait_outcomes(
        self, message_id: str, count: int = 1, topic: str | None = None, timeout: float = 15.0
    ) -> list[str]:
        """Wait until ``message_id`` was processed ``count`` times; its outcomes."""
        wait_until(
            lambda: len(self.outcomes(message_id, topic)) >= count,
            timeout=timeout,
            message=f"{count} outcome(s) of {message_id!r} (seen {self.processed()})",
        )
        return self.outcomes(message_id, topic)


@dataclass(frozen=True)
class Run:
    """A job as it started."""

    message_id: str
    retry_count: int
    attempt: int


class FnHandler:
    """A handler whose job for each delivery runs ``run(delivery)`` in ``lane(delivery)``."""

    renew_claim_first = False

    def __init__(
        self,
        topic: str,
        run: Callable[[Delivery], Effect | None],
        lane: Callable[[Delivery], str] | str = INLINE,
        *,
        never_dead_letter: bool = False,
    ) -> None:
        self.topic = topic
        self.never_dead_letter = never_dead_letter
        self._run = run
        self._lane = lane
        self._lock = threading.Lock()
        self.runs: list[Run] = []
        self.planned: list[Delivery] = []

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        with self._lock:
            self.planned += deliveries
        return [
            Job(d, _bind(self, d), self._lane(d) if callable(self._lane) else self._lane)
            for d in deliveries
        ]

    def started(self, delivery: Delivery) -> None:
        with self._lock:
            self.runs.append(Run(delivery.message.id, delivery.retry_count, delivery.attempt))

    def runs_of(self, message_id: str) -> list[Run]:
        with self._lock:
            return [r for r in self.runs if r.message_id == message_id]


def _bind(handler: FnHandler, delivery: Delivery) -> Callable[[], Effect | None]:
    def run() -> Effect | None:
        handler.started(delivery)
        return handler._run(delivery)

    return run


class CountingCommitter:
    """Wraps a committer: counts calls and their sizes; can raise ``TransientQueueError``
    (``failures`` times, or while ``down`` is set) and hold calls while ``hold`` is clear."""

    def __init__(self, inner: Committer) -> None:
        self.inner = inner
        self.sizes: list[int] = []
        self.failures = 0
        self.down = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        self.holding = threading.Event()
        self._lock = threading.Lock()

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        with self._lock:
            self.sizes.append(len(steps))
        if not self.hold.is_set():
            self.holding.set()
            self.hold.wait(BLOCK_S)
        with self._lock:
            failing = self.failures > 0 or self.down.is_set()
            self.failures = max(0, self.failures - 1)
        if failing:
            raise TransientQueueError("simulated: the database is down")
        return self.inner.commit(steps)

    def calls(self) -> list[int]:
        with self._lock:
            return list(self.sizes)


def message(n: int | str, key: str | None = None, payload: bytes = b"") -> Message:
    """Message ``m<n>``, alone in its partition unless ``key`` says otherwise."""
    return Message(id=f"m{n}", payload=payload, partition_key=key or f"p{n}")


_audit_groups = itertools.count(1)


def published(queue: MemoryQueue, topic: str) -> list[MemoryDelivery]:
    """Every message ever published to ``topic`` that is visible now, in order: read (and
    acked) through a consumer group of its own, new at each call."""
    subscription = queue.subscribe(topic, f"audit-{next(_audit_groups)}")
    seen: list[MemoryDelivery] = []
    try:
        while batch := subscription.fetch(1_000):
            for delivery in batch:
                delivery.ack()
            seen += batch
    finally:
        subscription.close()
    return seen


@contextmanager
def running(worker: Worker, grace_s: float = 5.0) -> Iterator[Worker]:
    worker.start()
    try:
        yield worker
    finally:
        worker.stop(grace_s)


# --- a subscription of scripted deliveries ----------------------------------------------------


@dataclass(eq=False)
class FakeDelivery:
    """A delivery the worker can run; it is settled only through a committer."""

    topic: str
    message: Message
    offset: int
    group: str = "g"
    attempt: int = 1
    retry_count: int = 0
    last_error: str = ""
    dead_letter: DeadLetter | None = None
    due_at_ms: int = 0
    delivered_at_ms: int = 0
    lost: bool = False

    def ack(self) -> None:
        raise AssertionError("the worker settles through its committer")

    def nack(self, requeue_after_ms: int | None = None, error: str = "") -> None:
        raise AssertionError("the worker settles through its committer")

    def reject(self, reason: str) -> None:
        raise AssertionError("the worker settles through its committer")

    def extend_visibility(self, ms: int) -> None:
        pass


class ScriptedSubscription:
    """Hands out the batches it was given, one per fetch, as they are."""

    def __init__(self, topic: str, batches: Sequence[Sequence[FakeDelivery]]) -> None:
        self.topic = topic
        self.group = "g"
        self.settings = FAST
        self._batches = [list(b) for b in batches]
        self._woken = threading.Event()
        self.fetching = threading.Event()  # cleared: fetch blocks until it is set
        self.fetching.set()

    def fetch(self, limit: int) -> list[FakeDelivery]:
        self.fetching.wait(BLOCK_S)
        if not self._batches:
            return []
        batch = self._batches.pop(0)
        assert len(batch) <= limit
        return batch

    def next_due_ms(self) -> int | None:
        return 0 if self._batches else None

    def wait(self, timeout_s: float) -> bool:
        woken = self._woken.wait(timeout_s)
        self._woken.clear()
        return woken

    def wake(self) -> None:
        self._woken.set()

    def wait_for_leases(self, timeout_s: float) -> bool:
        return True

    def hand_back(self, deliveries: Sequence[Delivery]) -> None:
        pass

    def abandon(self, deliveries: Sequence[Delivery]) -> None:
        pass

    def close(self) -> None:
        pass


class RecordingCommitter:
    """Settles every step (DONE) and remembers them, in commit order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.steps: list[Step] = []

    def commit(self, steps: Sequence[Step]) -> list[Settled]:
        with self._lock:
            self.steps += steps
        return [Settled.DONE] * len(steps)

    def settled_ids(self) -> list[str]:
        with self._lock:
            return [s.delivery.message.id for s in self.steps]


def fake_deliveries(topic: str, specs: Sequence[tuple[str, str]]) -> list[FakeDelivery]:
    """(message id, partition key) pairs as deliveries, offsets in order."""
    return [
        FakeDelivery(topic, Message(id=mid, payload=b"", partition_key=key), offset)
        for offset, (mid, key) in enumerate(specs, start=1)
    ]
