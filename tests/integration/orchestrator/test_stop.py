"""A stop whose grace runs out hands a running delivery back; when that work ends later, it
is not reported as a failure nor settled (issue 15, item 9)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import structlog

from buildq.buildrunner import TransientRunnerError
from buildq.queue.contract import Delivery, Effect
from buildq.queue.sql import SqlQueue
from buildq.queue.worker import Job, LaneSettings, Worker
from tests.integration.queue.test_publish import msg
from tests.support.waiting import wait_until


class SlowController:
    """Holds its delivery until released, then fails (as a call on a client that the
    stopping daemon closed does) or returns normally."""

    topic = "t"
    renew_claim_first = False
    never_dead_letter = False

    def __init__(self, fails: bool) -> None:
        self.fails = fails
        self.started = threading.Event()
        self.release = threading.Event()

    def plan(self, deliveries: list[Delivery]) -> list[Job]:
        return [Job(d, lambda d=d: self.handle(d), lane="slow") for d in deliveries]

    def handle(self, delivery: Delivery) -> Effect | None:
        self.started.set()
        self.release.wait(30)
        if self.fails:
            raise TransientRunnerError("Buildkite GET /builds/1 failed: client has been closed")
        return None


@pytest.mark.parametrize("fails", [True, False], ids=["work_fails", "work_returns"])
def test_work_that_ends_after_its_delivery_was_handed_back_is_not_a_failure(
    queue: SqlQueue,
    subscribe: Any,
    fails: bool,
) -> None:
    sub = subscribe("t")
    queue.publish("t", msg("m1"))
    controller = SlowController(fails)
    worker = Worker(queue.committer(), lanes={"slow": LaneSettings(concurrency=1)})
    worker.add(controller, sub)
    with structlog.testing.capture_logs() as logs:
        worker.start()
        wait_until(controller.started.is_set, message="the delivery is being worked on")
        worker.stop(grace_s=0.05)
        controller.release.set()
        wait_until(
            lambda: any(e["event"] == "handed_back_delivery_ended" for e in logs),
            message="the work ended",
        )

    events = [entry["event"] for entry in logs]
    assert "handback_after_grace" in events and "handed_back_delivery_ended" in events
    for wrong in ("handler_failed", "delivery_rejected", "delivery_nacked", "settle_failed"):
        assert wrong not in events, logs
    # Back in the queue as if never fetched: no retry counted, nothing dead-lettered.
    [again] = wait_until(lambda: sub.fetch(10), message="the handed-back delivery")
    assert again.message.id == "m1" and again.retry_count == 0
    assert queue.store.fetch_by_offset("t_dlq", "p", 0, 2**62, 10) == []
