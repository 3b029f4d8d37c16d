"""The handlers' decisions (trigger, poll loop, dead-letter reconcilers), run by the worker over
the in-memory queue and build store, with a sim runner scripted by poll count."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from buildq.buildrunner import (
    BuildID,
    BuildMetadata,
    BuildRunner,
    BuildStatus,
    Change,
    RunnerThrottled,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.buildrunner.noop import NoopRunner
from buildq.buildrunner.sim import SimConfig, SimProfile, SimRunner
from buildq.config import BuildQueueConfig, PollPolicy
from buildq.orchestrator.chain import Runners
from buildq.orchestrator.controllers import BuildController, BuildSignalController
from buildq.orchestrator.engine import classify
from buildq.orchestrator.memstore import MemoryBuildStore
from buildq.orchestrator.model import Build, BuildRequest, request_message
from buildq.orchestrator.reconciler import DeadLetterReconciler
from buildq.orchestrator.topics import (
    BUILD,
    BUILD_DLQ,
    BUILDRESULT,
    BUILDSIGNAL,
    BUILDSIGNAL_DLQ,
    GROUP,
)
from buildq.queue.contract import Delivery, Message
from buildq.queue.memory import MemoryAckedStep, MemoryQueue, MemorySession
from buildq.queue.settings import Backoff
from buildq.queue.worker import Handler, Job, LaneSettings, Worker
from tests.support.waiting import wait_until
from tests.unit.doubles import BLOCK_S, FAST, Events, ManualClock, published, running

RUNNER = "ci"
MAIN = "main"
#: One second per poll whatever the status or age; no deadlines unless a test sets them.
POLL = PollPolicy(
    accepted_interval_s=1.0,
    running_interval_s=1.0,
    growth=1.0,
    max_interval_s=60.0,
    jitter=0.0,
    start_by_s=0.0,
    finish_by_s=0.0,
)
STEP_MS = 1_000
THROTTLE_S = 7.0
_NEVER = 2**31 - 1


class RecordingRunner:
    """A runner's calls, recorded. ``status_fails`` makes status raise a transient error,
    ``status_refused`` an unauthorized one (a revoked token), ``status_throttled`` the CI's
    rate limit (come back in ``THROTTLE_S``); a status call waits while
    ``status_open`` is clear (a slow CI); ``forward_cancel = False`` keeps cancels from the
    runner (a CI that ignores them)."""

    def __init__(self, inner: BuildRunner, store: MemoryBuildStore) -> None:
        self.inner = inner
        self.store = store
        self.status_fails = threading.Event()
        self.status_refused = threading.Event()
        self.status_throttled = threading.Event()
        self.status_open = threading.Event()
        self.status_open.set()
        self.forward_cancel = True
        self._lock = threading.Lock()
        self.calls: list[tuple[str, str]] = []
        #: The stored build when each cancel was sent.
        self.stored_at_cancel: list[Build | None] = []

    def _record(self, call: str, build_id: str) -> None:
        with self._lock:
            self.calls.append((call, build_id))

    def count(self, call: str) -> int:
        with self._lock:
            return sum(1 for c, _ in self.calls if c == call)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        build_id = self.inner.trigger(queue, base, head, metadata)
        self._record("trigger", build_id.id)
        return build_id

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        self._record("status", build_id.id)
        self.status_open.wait(BLOCK_S)
        if self.status_fails.is_set():
            raise TransientRunnerError("simulated: the CI service is down")
        if self.status_refused.is_set():
            raise RunnerUnauthorized("simulated: 401 Unauthorized", "token refused")
        if self.status_throttled.is_set():
            raise RunnerThrottled("simulated: 429 Too Many Requests", THROTTLE_S)
        return self.inner.status(build_id)

    def cancel(self, build_id: BuildID) -> None:
        self._record("cancel", build_id.id)
        self.stored_at_cancel.append(self.store.get_by_build(build_id.id))
        if self.forward_cancel:
            self.inner.cancel(build_id)


class RecordingHandler:
    """A handler, and (message id, retry count, attempt) of every delivery it planned."""

    def __init__(self, inner: Handler) -> None:
        self.inner = inner
        self.topic = inner.topic
        self.renew_claim_first = inner.renew_claim_first
        self.never_dead_letter = inner.never_dead_letter
        self._lock = threading.Lock()
        self.seen: list[tuple[str, int, int]] = []

    def plan(self, deliveries: Sequence[Delivery]) -> Sequence[Job]:
        with self._lock:
            self.seen += [(d.message.id, d.retry_count, d.attempt) for d in deliveries]
        return self.inner.plan(deliveries)


class Harness:
    """The daemon's handlers on one worker, over the memory queue and build store."""

    def __init__(
        self,
        clock: ManualClock,
        queue: MemoryQueue,
        *,
        runner: str = "sim",
        sim_polls: int = 5,
        poll: PollPolicy = POLL,
        max_attempts: int = 5,
    ) -> None:
        self.clock = clock
        self.queue = queue
        self.store = MemoryBuildStore()
        profile = SimProfile(failure_probability=0.0, polls=sim_polls)
        self.sim = SimRunner(SimConfig(default=profile, seed=1), clock=clock.seconds)
        self.runner = RecordingRunner(self.sim if runner == "sim" else NoopRunner(), self.store)
        self.events = Events()
        #: (topic, message id) of every message the committed steps published, duplicates too.
        self.attempts: list[tuple[str, str]] = []
        runners = Runners(
            {RUNNER: self.runner}, {MAIN: BuildQueueConfig(MAIN, RUNNER, poll)}, now_ms=clock
        )
        self.worker = Worker(
            queue.committer(self._apply),
            lanes={RUNNER: LaneSettings(concurrency=4)},
            classify=classify,
            on_event=self.events,
        )
        handlers: list[Handler] = [
            BuildController(runners, self.store),
            BuildSignalController(runners, self.store, rng=random.Random(1)),
            DeadLetterReconciler(BUILD_DLQ, runners, self.store),
            DeadLetterReconciler(BUILDSIGNAL_DLQ, runners, self.store),
        ]
        self.handlers: dict[str, RecordingHandler] = {}
        settings = dataclasses.replace(
            FAST,
            max_attempts=max_attempts,
            backoff=Backoff(initial_ms=STEP_MS, multiplier=1.0, jitter=0.0),
        )
        for handler in handlers:
            recording = self.handlers[handler.topic] = RecordingHandler(handler)
            topic_settings = settings
            if handler.never_dead_letter:  # as the daemon wires them
                topic_settings = dataclasses.replace(settings, max_attempts=_NEVER)
            subscription = queue.subscribe(handler.topic, GROUP, topic_settings)
            self.worker.add(recording, subscription)

    def _apply(self, session: MemorySession, steps: Sequence[MemoryAckedStep]) -> None:
        self.store.apply(session, steps)
        for step in steps:
            self.attempts += [(topic, message.id) for topic, message, _ in step.outbox.messages]

    # --- driving ----------------------------------------------------------------------------

    def request(self, request_id: str, message_id: str | None = None, queue: str = MAIN) -> str:
        """Publish a build request (under ``message_id``, else the request's own); its id."""
        request = BuildRequest(request_id, queue, (), (Change("c1", "abc"),), {"who": "test"})
        message = request_message(request)
        if message_id is not None:
            message = dataclasses.replace(message, id=message_id)
        self.queue.publish(BUILD, message)
        return message.id

    def triggered(self, request_id: str) -> str:
        """Request ``request_id``, wait for its trigger, and return the build id."""
        assert self.events.wait_outcomes(self.request(request_id), topic=BUILD) == ["ack"]
        build = self.store.get_by_request(request_id)
        assert build is not None and build.build_id is not None
        assert (build.build_status, build.polls) == (BuildStatus.ACCEPTED, 0)
        return build.build_id

    def poll(self, build_id: str, n: int) -> Build:
        """Let a poll interval pass and wait for ``<build>/poll/<n>``; the build after it."""
        self.clock.advance(STEP_MS)
        assert self.events.wait_outcomes(poll_id(build_id, n), topic=BUILDSIGNAL) == ["ack"]
        return self.build(build_id)

    def nudge(self, build_id: str, message_id: str) -> None:
        """Publish a poll of ``build_id`` by hand, as ``buildq queue publish`` or a hook would."""
        self.queue.publish(BUILDSIGNAL, Message(message_id, BuildID(build_id).to_bytes(), build_id))

    # --- looking --------------------------------------------------------------------------------

    def build(self, build_id: str) -> Build:
        build = self.store.get_by_build(build_id)
        assert build is not None
        return build

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(d.message.payload) for d in published(self.queue, BUILDRESULT)]

    def polls_published(self) -> list[str]:
        """Every poll message id the committed steps published, in order, duplicates too."""
        return [mid for topic, mid in self.attempts if topic == BUILDSIGNAL]

    def seen(self, topic: str) -> list[tuple[str, int, int]]:
        with self.handlers[topic]._lock:
            return list(self.handlers[topic].seen)


def poll_id(build_id: str, n: int) -> str:
    return f"{build_id}/poll/{n}"


def polls(build_id: str, numbers: Sequence[int]) -> list[str]:
    return [poll_id(build_id, n) for n in numbers]


# --- the poll loop ------------------------------------------------------------------------------


def test_a_build_is_polled_by_count_until_done_then_one_result(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        for n in range(1, 5):
            build = h.poll(build_id, n)
            assert (build.build_status, build.polls) == (BuildStatus.RUNNING, n)
        build = h.poll(build_id, 5)

    assert (build.build_status, build.polls) == (BuildStatus.SUCCEEDED, 5)
    assert build.finished_at_ms == clock()
    # Every poll a first delivery (no retry spent on polling), ids derived from the count.
    assert h.seen(BUILDSIGNAL) == [(poll_id(build_id, n), 0, 1) for n in range(1, 6)]
    assert h.polls_published() == polls(build_id, range(1, 6))
    assert (h.runner.count("trigger"), h.runner.count("status")) == (1, 5)
    [result] = h.results()
    assert (result["request_id"], result["build_id"], result["status"]) == (
        "r1",
        build_id,
        "SUCCEEDED",
    )


def test_a_noop_build_finishes_on_its_first_poll(clock: ManualClock, queue: MemoryQueue) -> None:
    h = Harness(clock, queue, runner="noop")
    with running(h.worker):
        build_id = h.triggered("r1")
        build = h.poll(build_id, 1)

    assert build_id.startswith("noop-")
    assert (build.build_status, build.polls) == (BuildStatus.SUCCEEDED, 1)
    assert h.polls_published() == [poll_id(build_id, 1)]
    assert [r["status"] for r in h.results()] == ["SUCCEEDED"]


def test_a_replayed_request_continues_the_live_chain_instead_of_starting_another(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    """Issue 14 item 4: a replay publishes the build's next poll, which collides with the
    live poll message; there is never more than one live poll per build."""
    h = Harness(clock, queue, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        replay = h.request("r1", message_id="r1/request/replayed")
        assert h.events.wait_outcomes(replay, topic=BUILD) == ["ack"]
        # The replay published poll/2, the live chain's next message: a duplicate.
        assert h.polls_published() == polls(build_id, [1, 2, 2])
        for n in range(2, 6):
            h.poll(build_id, n)
        again = h.request("r1", message_id="r1/request/after-the-end")
        assert h.events.wait_outcomes(again, topic=BUILD) == ["ack"]

    assert h.build(build_id).build_status is BuildStatus.SUCCEEDED
    assert h.polls_published() == polls(build_id, [1, 2, 2, 3, 4, 5])  # nothing after the end
    assert [mid for mid, _, _ in h.seen(BUILDSIGNAL)] == polls(build_id, range(1, 6))
    assert (h.runner.count("trigger"), h.runner.count("status")) == (1, 5)
    assert len(h.results()) == 1


def test_a_nudge_takes_the_count_on_and_the_pending_chain_poll_goes_stale(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        h.nudge(build_id, "nudge-1")  # visible at once; poll/2 waits its interval
        assert h.events.wait_outcomes("nudge-1", topic=BUILDSIGNAL) == ["ack"]
        assert h.build(build_id).polls == 2

        clock.advance(STEP_MS)  # the stale poll/2 and the chain's poll/3 are both due
        assert h.events.wait_outcomes(poll_id(build_id, 2), topic=BUILDSIGNAL) == ["ack"]
        assert h.events.wait_outcomes(poll_id(build_id, 3), topic=BUILDSIGNAL) == ["ack"]
        assert h.build(build_id).polls == 3
        h.poll(build_id, 4)
        build = h.poll(build_id, 5)
        assert build.build_status is BuildStatus.SUCCEEDED

        # A poll of a finished build: acked, nothing asked, nothing published.
        h.nudge(build_id, "nudge-after-the-end")
        assert h.events.wait_outcomes("nudge-after-the-end", topic=BUILDSIGNAL) == ["ack"]

    # poll 1, the nudge, 3, 4, 5: the stale poll/2 asked nothing and published nothing.
    assert h.runner.count("status") == 5
    assert h.polls_published() == polls(build_id, [1, 2, 3, 4, 5])
    assert len(h.results()) == 1


def test_a_poll_numbered_below_the_count_is_stale(clock: ManualClock, queue: MemoryQueue) -> None:
    h = Harness(clock, queue, sim_polls=3)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        h.nudge(build_id, poll_id(build_id, 4))  # a poll from ahead: the count jumps to 4
        assert h.events.wait_outcomes(poll_id(build_id, 4), topic=BUILDSIGNAL) == ["ack"]
        assert h.build(build_id).polls == 4

        clock.advance(STEP_MS)
        assert h.events.wait_outcomes(poll_id(build_id, 2), topic=BUILDSIGNAL) == ["ack"]
        assert h.events.wait_outcomes(poll_id(build_id, 5), topic=BUILDSIGNAL) == ["ack"]

    build = h.build(build_id)
    assert (build.build_status, build.polls) == (BuildStatus.SUCCEEDED, 5)
    assert h.runner.count("status") == 3  # poll/2 (2 <= 4 polls) asked nothing
    assert h.polls_published() == polls(build_id, [1, 2, 5])
    assert len(h.results()) == 1


@pytest.mark.parametrize(
    ("deadline", "polls_first", "error"),
    [
        ({"finish_by_s": 3.5}, 3, "not finished within finish_by_s=3.5"),
        ({"start_by_s": 0.5}, 0, "not started within start_by_s=0.5"),
    ],
)
def test_a_build_past_its_deadline_is_cancelled_and_fails_with_timeout(
    clock: ManualClock,
    queue: MemoryQueue,
    deadline: dict[str, float],
    polls_first: int,
    error: str,
) -> None:
    h = Harness(clock, queue, sim_polls=1_000, poll=dataclasses.replace(POLL, **deadline))
    with running(h.worker):
        build_id = h.triggered("r1")
        for n in range(1, polls_first + 1):
            assert h.poll(build_id, n).build_status is BuildStatus.RUNNING
        build = h.poll(build_id, polls_first + 1)

    assert (build.build_status, build.failure_reason, build.error) == (
        BuildStatus.FAILED,
        "timeout",
        error,
    )
    assert h.runner.count("status") == polls_first
    assert h.runner.count("cancel") == 1
    [at_cancel] = h.runner.stored_at_cancel
    assert at_cancel is not None and not at_cancel.is_terminal  # cancelled, then recorded
    assert h.sim.status(BuildID(build_id))[0] is BuildStatus.CANCELLED
    assert h.polls_published() == polls(build_id, range(1, polls_first + 2))
    [result] = h.results()
    assert (result["status"], result["failure_reason"]) == ("FAILED", "timeout")


def test_a_cancel_request_is_sent_once_and_the_build_finishes_cancelled(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        h.poll(build_id, 2)
        assert h.store.request_cancel(build_id, clock())
        build = h.poll(build_id, 3)

    assert (build.build_status, build.failure_reason) == (BuildStatus.CANCELLED, "cancelled")
    assert h.runner.count("cancel") == 1
    assert h.polls_published() == polls(build_id, [1, 2, 3])
    [result] = h.results()
    assert result["status"] == "CANCELLED"


def test_a_cancel_is_not_sent_again_while_the_runner_has_not_acted_on_it(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5)
    h.runner.forward_cancel = False  # a CI service slow to stop the build
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        assert h.store.request_cancel(build_id, clock())
        build = h.poll(build_id, 2)
        assert build.build_status is BuildStatus.RUNNING
        assert build.cancel_sent_at_ms == clock()
        for n in (3, 4):
            h.poll(build_id, n)
        build = h.poll(build_id, 5)

    assert build.build_status is BuildStatus.SUCCEEDED  # it finished before it stopped
    assert h.runner.count("cancel") == 1
    assert len(h.results()) == 1


def test_a_refused_token_keeps_the_build_polled_without_spending_retries(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=3, max_attempts=2)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)  # the sim's first answer: RUNNING
        h.runner.status_refused.set()
        for n in (2, 3, 4):  # more refusals than max_attempts
            build = h.poll(build_id, n)
            assert (build.build_status, build.polls) == (BuildStatus.RUNNING, n)
        h.runner.status_refused.clear()  # the operator fixed the token
        h.poll(build_id, 5)  # the sim's second answer: RUNNING
        build = h.poll(build_id, 6)

    assert build.build_status is BuildStatus.SUCCEEDED
    assert h.seen(BUILDSIGNAL) == [(poll_id(build_id, n), 0, 1) for n in range(1, 7)]
    assert [r["status"] for r in h.results()] == ["SUCCEEDED"]


def test_a_rate_limited_poll_waits_out_the_limit_without_a_retry_or_a_held_call(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=2, max_attempts=1)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)  # RUNNING
        h.runner.status_throttled.set()
        clock.advance(STEP_MS)
        assert h.events.wait_outcomes(poll_id(build_id, 2), topic=BUILDSIGNAL) == ["defer"]
        # The limit's wait is the queue's: no call is in flight, nothing was retried.
        assert h.worker.lane_load().get(RUNNER, (0, 0)) == (0, 0)
        assert h.build(build_id).polls == 1
        h.runner.status_throttled.clear()
        clock.advance(int(THROTTLE_S * 1000))
        outcomes = h.events.wait_outcomes(poll_id(build_id, 2), 2, topic=BUILDSIGNAL)

    assert outcomes == ["defer", "ack"]
    assert h.build(build_id).build_status is BuildStatus.SUCCEEDED
    # Deferred, not nacked: still retry_count 0 (max_attempts 1 would have dead-lettered it).
    assert h.seen(BUILDSIGNAL)[-2:] == [(poll_id(build_id, 2), 0, 1), (poll_id(build_id, 2), 0, 2)]
    assert [r["status"] for r in h.results()] == ["SUCCEEDED"]


def test_a_refused_token_does_not_keep_a_build_past_its_deadline(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, poll=dataclasses.replace(POLL, finish_by_s=2.5))
    h.runner.status_refused.set()
    with running(h.worker):
        build_id = h.triggered("r1")
        for n in (1, 2):
            assert h.poll(build_id, n).build_status is BuildStatus.ACCEPTED
        build = h.poll(build_id, 3)

    assert (build.build_status, build.failure_reason) == (BuildStatus.FAILED, "timeout")
    assert h.runner.count("cancel") == 1
    assert [r["failure_reason"] for r in h.results()] == ["timeout"]


# --- dead letters -------------------------------------------------------------------------------


def test_a_stray_letter_on_the_poll_dlq_leaves_the_build_running(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        payload = BuildID(build_id).to_bytes()
        strays = [poll_id(build_id, 1), poll_id(build_id, 7), "typo"]  # next is poll/2
        for stray in strays:
            queue.publish(BUILDSIGNAL_DLQ, Message(stray, payload, build_id))
        for stray in strays:
            assert h.events.wait_outcomes(stray, topic=BUILDSIGNAL_DLQ) == ["ack"]
        assert h.build(build_id).build_status is BuildStatus.RUNNING
        build = h.poll(build_id, 2)

    assert (build.build_status, build.polls) == (BuildStatus.RUNNING, 2)
    assert h.runner.count("cancel") == 0
    assert h.results() == []


def test_the_chains_own_dead_letter_cancels_the_build_and_fails_it_infra(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue, sim_polls=5, max_attempts=3)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        h.runner.status_fails.set()
        dead = poll_id(build_id, 2)
        for attempt in range(1, 4):
            clock.advance(STEP_MS)  # the poll interval, then the nack backoff
            assert h.events.wait_outcomes(dead, attempt, topic=BUILDSIGNAL) == ["nack"] * attempt
        assert h.events.wait_outcomes(dead, topic=BUILDSIGNAL_DLQ) == ["ack"]

    build = h.build(build_id)
    assert (build.build_status, build.failure_reason) == (BuildStatus.FAILED, "infra")
    assert build.error is not None
    assert build.error.startswith("poll dead-lettered: TransientRunnerError: simulated")
    assert [(rc, a) for mid, rc, a in h.seen(BUILDSIGNAL) if mid == dead] == [
        (0, 1),
        (1, 2),
        (2, 3),
    ]
    assert h.runner.count("cancel") == 1
    [at_cancel] = h.runner.stored_at_cancel
    assert at_cancel is not None and not at_cancel.is_terminal  # cancelled first
    assert h.sim.status(BuildID(build_id))[0] is BuildStatus.CANCELLED
    [result] = h.results()
    assert (result["status"], result["failure_reason"]) == ("FAILED", "infra")


def test_a_poll_that_finishes_a_build_the_reconciler_finished_meanwhile_changes_nothing(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    """Terminal status is write-once: the first finisher's result is the only one."""
    h = Harness(clock, queue, sim_polls=2)
    with running(h.worker):
        build_id = h.triggered("r1")
        h.poll(build_id, 1)
        h.runner.status_open.clear()
        try:
            clock.advance(STEP_MS)  # poll/2 (the last) starts, and waits on the CI service
            wait_until(lambda: h.runner.count("status") == 2)
            # Meanwhile the chain's next poll id reaches the DLQ (an operator's requeue, say).
            letter = Message(poll_id(build_id, 2), BuildID(build_id).to_bytes(), build_id)
            queue.publish(BUILDSIGNAL_DLQ, letter)
            assert h.events.wait_outcomes(letter.id, topic=BUILDSIGNAL_DLQ) == ["ack"]
            assert h.build(build_id).failure_reason == "infra"
        finally:
            h.runner.status_open.set()
        assert h.events.wait_outcomes(poll_id(build_id, 2), topic=BUILDSIGNAL) == ["ack"]

    build = h.build(build_id)
    assert (build.build_status, build.failure_reason) == (BuildStatus.FAILED, "infra")
    assert [(r["status"], r["failure_reason"]) for r in h.results()] == [("FAILED", "infra")]


def test_malformed_payloads_are_dead_lettered_with_a_reason(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue)
    with running(h.worker):
        queue.publish(BUILD, Message("junk/request", b"not json", "junk"))
        queue.publish(BUILDSIGNAL, Message("junk/poll/1", b'{"id": ""}', "junk-build"))
        assert h.events.wait_outcomes("junk/request", topic=BUILD) == ["reject"]
        assert h.events.wait_outcomes("junk/poll/1", topic=BUILDSIGNAL) == ["reject"]
        # The reconcilers: a request never recorded is failed; a poll of no build is let go.
        assert h.events.wait_outcomes("junk/request", topic=BUILD_DLQ) == ["ack"]
        assert h.events.wait_outcomes("junk/poll/1", topic=BUILDSIGNAL_DLQ) == ["ack"]

    [request_letter] = published(queue, BUILD_DLQ)
    assert request_letter.dead_letter is not None
    assert request_letter.dead_letter.original_topic == BUILD
    assert request_letter.dead_letter.last_error.startswith(
        "MalformedPayload: build request is not JSON"
    )
    [poll_letter] = published(queue, BUILDSIGNAL_DLQ)
    assert poll_letter.dead_letter is not None
    assert poll_letter.dead_letter.last_error == (
        "MalformedPayload: BuildID payload needs a non-empty string field 'id'"
    )
    failed = h.store.get_by_request("junk")
    assert failed is not None
    assert (failed.build_status, failed.failure_reason) == (BuildStatus.FAILED, "infra")
    assert [(r["request_id"], r["status"]) for r in h.results()] == [("junk", "FAILED")]
    assert h.runner.calls == []


def test_a_dead_request_never_recorded_is_failed_infra_once(
    clock: ManualClock, queue: MemoryQueue
) -> None:
    h = Harness(clock, queue)
    with running(h.worker):
        letter = h.request("r9", queue="no-such-queue")  # Unprocessable: to the DLQ at once
        assert h.events.wait_outcomes(letter, topic=BUILD) == ["reject"]
        assert h.events.wait_outcomes(letter, topic=BUILD_DLQ) == ["ack"]
        failed = h.store.get_by_request("r9")
        # The same request dead-lettered again (another id): it is recorded now.
        queue.publish(BUILD_DLQ, dataclasses.replace(request_message_of(h, "r9"), id="again"))
        assert h.events.wait_outcomes("again", topic=BUILD_DLQ) == ["ack"]

    assert failed is not None
    assert (failed.build_id, failed.build_status, failed.failure_reason) == (
        None,
        BuildStatus.FAILED,
        "infra",
    )
    assert failed.error is not None and "unknown queue 'no-such-queue'" in failed.error
    assert failed.request_metadata == {"who": "test"}
    assert h.store.get_by_request("r9") == failed
    assert [(r["request_id"], r["status"]) for r in h.results()] == [("r9", "FAILED")]
    assert h.runner.calls == []


def request_message_of(h: Harness, request_id: str) -> Message:
    [delivery] = [d for d in published(h.queue, BUILD) if d.message.partition_key == request_id]
    return delivery.message


@pytest.mark.parametrize("runner", ["noop", "sim"])
def test_a_dead_request_letter_of_a_recorded_request_changes_nothing(
    clock: ManualClock, queue: MemoryQueue, runner: str
) -> None:
    h = Harness(clock, queue, runner=runner, sim_polls=5)
    with running(h.worker):
        build_id = h.triggered("r1")
        before = h.poll(build_id, 1)  # noop: finished; sim: running
        results = h.results()
        queue.publish(BUILD_DLQ, request_message_of(h, "r1"))
        assert h.events.wait_outcomes("r1/request", topic=BUILD_DLQ) == ["ack"]
        assert h.build(build_id) == before
        assert h.results() == results
        if runner == "sim":
            assert h.poll(build_id, 2).polls == 2  # the chain goes on

    assert h.runner.count("cancel") == 0
