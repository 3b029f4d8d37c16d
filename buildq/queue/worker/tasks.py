"""A claimed delivery on its way through the worker (a task), and the fetcher it came from
(its route).

A fetcher waits only for its own room: ``Route.moving`` counts the tasks it claimed that are
being planned, run inline or committed. A task waiting in or for a lane, or behind its
partition, is not counted (``uncount``) until it comes back (``count``). Every field here is
guarded by the worker's lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from buildq.queue.contract import Settled, Step, Subscription
from buildq.queue.worker.contract import Handler, Job


@dataclass(eq=False)
class Route:
    handler: Handler
    subscription: Subscription
    #: Where its fetcher waits for room (on the worker's lock).
    room: threading.Condition
    #: Claimed by this fetcher and not in a lane nor behind its partition: its room.
    moving: int = 0
    released: list[Task] = field(default_factory=list)
    last_tick: float = field(default_factory=time.monotonic)


@dataclass(eq=False, slots=True)
class Task:
    route: Route
    job: Job
    fetched_at: float
    queued_at: float = 0.0
    started_at: float = 0.0
    #: Counted in its fetcher's room (``Route.moving``): claimed and not waiting in or for
    #: a lane, nor behind its partition.
    counted: bool = True
    #: Why it was given up ("timed out", "handed back"): what its job returns later is ignored.
    abandoned: str = ""
    step: Step | None = None

    @property
    def partition(self) -> tuple[str, str]:
        delivery = self.job.delivery
        return delivery.topic, delivery.message.partition_key


#: Accounts for settled (or given up) tasks and starts what waited behind them (the worker's).
Finish = Callable[[Sequence[Task], Sequence[Settled | None]], None]


def count(task: Task) -> None:
    if not task.counted:
        task.counted = True
        task.route.moving += 1


def uncount(task: Task) -> None:
    if task.counted:
        task.counted = False
        task.route.moving -= 1


def describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return f"{type(err).__name__}: {text}"[:2000]
