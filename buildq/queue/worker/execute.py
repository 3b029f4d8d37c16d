"""Running one job: confirm its claim if its handler asks, call it, and turn what it returned
or raised into what becomes of its delivery.

A job that returns gives an ack with its effect. One that raises gets what the worker's
classifier says, else the default for the worker's own exceptions (``Retry``, ``Postpone``,
``Unprocessable``), else a reject: an unexpected error is logged with its traceback. A
delivery whose claim is gone before the job starts does not run. What a job given up on
(timed out, handed back) returns or raises later is nobody's business: it is logged only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from buildq.queue.contract import (
    Ack,
    Action,
    Defer,
    Effect,
    InvalidMessage,
    Nack,
    Reject,
    Settled,
    TransientQueueError,
)
from buildq.queue.worker.contract import Classifier, EventHook, Postpone, Retry, Unprocessable
from buildq.queue.worker.tasks import Finish, Task, describe

log = structlog.get_logger("buildq.worker")


class Executor:
    def __init__(self, classify: Classifier | None, emit: EventHook, finish: Finish) -> None:
        self._classify = classify
        self._emit = emit
        self._finish = finish

    def execute(self, task: Task) -> Action | None:
        """Run the task's job: what to do with its delivery (None: nothing, it is gone)."""
        delivery = task.job.delivery
        if delivery.lost or not self._claim_confirmed(task):
            self._emit("delivery_expired_before_start", topic=delivery.topic)
            self._finish([task], [Settled.LOST])
            return None
        task.started_at = time.monotonic()
        try:
            return Ack(task.job.run())
        except Exception as err:
            if task.abandoned:  # a failure of work given up on is nobody's failure
                self.ended_after_abandon(task, err)
                return None
            return self.action_for(task, err)

    def ended_after_abandon(self, task: Task, err: Exception | None) -> None:
        delivery = task.job.delivery
        log.info(
            "handed_back_delivery_ended" if task.abandoned == "handed back" else "late_call_ended",
            topic=delivery.topic,
            message_id=delivery.message.id,
            failed=err is not None,
            **task.job.context,
        )

    def _claim_confirmed(self, task: Task) -> bool:
        """For a handler that renews first: make sure a claim that is no longer fresh is
        still ours right now (one statement; a fresh claim needs none)."""
        route, delivery = task.route, task.job.delivery
        timeout_ms = route.subscription.settings.visibility_timeout_ms
        fresh = time.monotonic() - task.fetched_at < timeout_ms / 4000
        if not route.handler.renew_claim_first or fresh:
            return True
        try:
            delivery.extend_visibility(timeout_ms)
        except TransientQueueError as err:  # the database is struggling: run as fetched
            log.warning("claim_renewal_failed", error=describe(err)[:300])
        except Exception as err:  # DeliveryLost: someone else has it now
            log.warning(
                "delivery_expired_before_start",
                message_id=delivery.message.id,
                error=str(err)[:200],
            )
            return False
        return True

    def action_for(self, task: Task, err: BaseException) -> Action:
        """What the error ``err`` of the task's job means for its delivery."""
        delivery = task.job.delivery
        about = {"topic": delivery.topic, "message_id": delivery.message.id, **task.job.context}
        action = self._classify(err) if self._classify is not None else None
        if action is None:
            action = _default_action(err)
        if action is None:
            log.error("handler_failed", exc_info=err, **about)
            action = Reject(f"unexpected error: {describe(err)}")
        if isinstance(action, Reject) and task.route.handler.never_dead_letter:
            action = Nack(None, action.reason)
        if isinstance(action, Nack):
            log.warning(
                "delivery_nacked", error=action.error, retry_count=delivery.retry_count, **about
            )
        elif isinstance(action, Reject):
            log.warning(
                "delivery_rejected", error=action.reason, retry_count=delivery.retry_count, **about
            )
        return action


def raiser(err: BaseException) -> Callable[[], Effect | None]:
    """A job's ``run`` that raises ``err``."""

    def run() -> Effect | None:
        raise err

    return run


def _default_action(err: BaseException) -> Action | None:
    if isinstance(err, Retry):
        return Nack(err.delay_ms, describe(err))
    if isinstance(err, Postpone):
        return Defer(err.delay_ms)
    if isinstance(err, TransientQueueError):
        return Nack(None, describe(err))
    if isinstance(err, Unprocessable | InvalidMessage):
        return Reject(describe(err))
    return None
