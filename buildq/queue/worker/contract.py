"""What a worker's user writes and hands it: handlers that plan jobs, the exceptions a job
raises to say what becomes of its delivery, the settings of a lane, and what the worker
reports (metrics, events)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from buildq.queue.contract import Action, Delivery, Effect

#: The lane of jobs that do no I/O: they run on the fetcher's thread.
INLINE = ""


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
#: Called with an event name and key/values ("processed", "fetch_failed", …): tests wait on
#: these instead of sleeping; None in production.
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
