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

The public names are here; the parts live in ``worker`` (the ``Worker``: fetching, planning,
lifecycle), ``contract`` (what a user writes and hands it), ``lanes``, ``partitions``,
``execute`` (one job and its outcome), ``commits`` (the commit thread) and ``tasks``.
"""

from __future__ import annotations

from buildq.queue.worker.contract import (
    INLINE,
    Classifier,
    EventHook,
    Handler,
    Job,
    LaneSettings,
    Postpone,
    Retry,
    Unprocessable,
    WorkerMetrics,
)
from buildq.queue.worker.worker import Worker

__all__ = [
    "INLINE",
    "Classifier",
    "EventHook",
    "Handler",
    "Job",
    "LaneSettings",
    "Postpone",
    "Retry",
    "Unprocessable",
    "Worker",
    "WorkerMetrics",
]
