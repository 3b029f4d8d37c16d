"""The worker's decisions, over the in-memory queue (and, for partition order, over scripted
deliveries: the memory queue hands out one delivery per partition at a time, the SQL queue
may hand out several)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import Counter
from collections.abc import Callable, MutableMapping, Sequence
from typing import Any

import pytest

from buildq.queue.contract import (
    Ack,
    Action,
    Committer,
    DeadLetter,
    Defer,
    Delivery,
    Effect,
    Message,
    Outbox,
    Reject,
    dlq_topic,
)
from buildq.queue.memory import MemoryQueue, MemorySubscription
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.worker import (
    INLINE,
    Classifier,
    Job,
    LaneSettings,
    Postpone,
    Retry,
    Unprocessable,
    Worker,
)
from buildq.queue.worker.worker import _STOP_MARGIN_S
from tests.support.waiting import wait_until
from tests.unit.doubles import (
    BLOCK_S,
    FAST,
    CountingCommitter,
    Events,
    FnHandler,
    ManualClock,
    RecordingCommitter,
    Run,
    ScriptedSubscription,
    fake_deliveries,
    message,
    published,
    running,
)

TOPIC = "t"
#: What a test allows stop() beyond its grace: the worker's own margin, twice (a loaded machine).
STOP_BOUND_S = 2 * _STOP_MARGIN_S


def make_worker(
    queue: MemoryQueue,
    handler: FnHandler,
    events: Events,
    *,
    lanes: dict[str, LaneSettings] | None = None,
    committer: Committer | None = None,
    classify: Classifier | None = None,
    settings: SubscriptionSettings = FAST,
) -> tuple[Worker, MemorySubscription]:
    subscription = queue.subscribe(handler.topic, "g", settings)
    worker = Worker(committer or queue.committer(), lanes=lanes, classify=classify, on_event=events)
    worker.add(handler, subscription)
    return worker, subscription


def publishes(message_id: str) -> Effect:
    """An effect that publishes ``message_id`` to ``out``."""

    def effect(outbox: Outbox) -> None:
        outbox.publish("out", Message(message_id, b"", message_id))

    return effect


def waits_for(gate: threading.Event) -> Callable[[Delivery], Effect | None]:
    """A job that waits until ``gate`` is set (a call to a CI service that hangs)."""

    def run(delivery: Delivery) -> Effect | None:
        gate.wait(BLOCK_S)
        return None

    return run


def out_ids(queue: MemoryQueue) -> list[str]:
    return sorted(d.message.id for d in published(queue, "out"))


def dead_letters(queue: MemoryQueue) -> dict[str, DeadLetter | None]:
    return {d.message.id: d.dead_letter for d in published(queue, dlq_topic(TOPIC))}


# --- lanes --------------------------------------------------------------------------------------


def test_a_job_blocked_in_one_lane_delays_neither_another_lane_nor_inline_jobs(
    queue: MemoryQueue,
) -> None:
    gate = threading.Event()

    def run(delivery: Delivery) -> Effect | None:
        if delivery.message.payload == b"A":
            gate.wait(BLOCK_S)
        return None

    handler = FnHandler(TOPIC, run, lane=lambda d: d.message.payload.decode())
    events = Events()
    lanes = {"A": LaneSettings(concurrency=1), "B": LaneSettings(concurrency=2)}
    worker, _ = make_worker(queue, handler, events, lanes=lanes)
    queue.publish(TOPIC, message("a", payload=b"A"))
    for i in range(5):
        queue.publish(TOPIC, message(f"b{i}", payload=b"B"))
        queue.publish(TOPIC, message(f"i{i}", payload=INLINE.encode()))

    with running(worker):
        try:
            for i in range(5):
                assert events.wait_outcomes(f"mb{i}") == ["ack"]
                assert events.wait_outcomes(f"mi{i}") == ["ack"]
            queue.publish(TOPIC, message("later", payload=b""))  # fetched after A blocked
            assert events.wait_outcomes("mlater") == ["ack"]
            assert events.outcomes("ma") == []
            wait_until(lambda: worker.lane_load()["A"] == (1, 0))
        finally:
            gate.set()
        assert events.wait_outcomes("ma") == ["ack"]


def test_a_lane_never_runs_more_than_its_concurrency(queue: MemoryQueue) -> None:
    lock = threading.Lock()
    release = threading.Event()
    now_running = peak = 0

    def run(delivery: Delivery) -> Effect | None:
        nonlocal now_running, peak
        with lock:
            now_running += 1
            peak = max(peak, now_running)
        try:
            release.wait(BLOCK_S)
        finally:
            with lock:
                now_running -= 1
        return None

    handler = FnHandler(TOPIC, run, lane="L")
    events = Events()
    lanes = {"L": LaneSettings(concurrency=3, room=100)}
    worker, _ = make_worker(queue, handler, events, lanes=lanes)
    for i in range(12):
        queue.publish(TOPIC, message(i))

    with running(worker):
        try:
            wait_until(lambda: worker.lane_load()["L"] == (3, 9), message="3 running, 9 waiting")
        finally:
            release.set()
        for i in range(12):
            assert events.wait_outcomes(f"m{i}") == ["ack"]
    assert peak == 3


def test_a_lane_over_its_room_defers_the_extra_deliveries_without_a_retry(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    lanes = {"L": LaneSettings(concurrency=1, room=1, defer_ms=5_000)}
    worker, subscription = make_worker(queue, handler, events, lanes=lanes)
    for i in range(4):
        queue.publish(TOPIC, message(i))

    with running(worker):
        try:
            assert events.wait_outcomes("m2") == ["defer"]
            assert events.wait_outcomes("m3") == ["defer"]
            wait_until(lambda: worker.lane_load()["L"] == (1, 1))
            assert subscription.next_due_ms() == 5_000
        finally:
            gate.set()
        assert events.wait_outcomes("m0") == ["ack"]
        assert events.wait_outcomes("m1") == ["ack"]
        clock.advance(5_000)
        assert events.wait_outcomes("m2", 2) == ["defer", "ack"]
        assert events.wait_outcomes("m3", 2) == ["defer", "ack"]
    # Deferred before they started: their one run is their second delivery, with no retry.
    assert handler.runs_of("m2") == [Run("m2", 0, 2)]
    assert handler.runs_of("m3") == [Run("m3", 0, 2)]


def test_deliveries_of_one_partition_run_one_at_a_time_in_claim_order() -> None:
    deliveries = fake_deliveries(TOPIC, [("a1", "a"), ("a2", "a"), ("b1", "b"), ("a3", "a")])
    subscription = ScriptedSubscription(TOPIC, [deliveries])
    committer = RecordingCommitter()
    b_started = threading.Event()
    lock = threading.Lock()
    running_in_a = 0
    overlapped = False
    # (message id, what was settled when it started)
    started: list[tuple[str, list[str]]] = []

    def run(delivery: Delivery) -> Effect | None:
        nonlocal running_in_a, overlapped
        if delivery.message.partition_key == "b":
            b_started.set()
            return None
        with lock:
            running_in_a += 1
            overlapped = overlapped or running_in_a > 1
            started.append((delivery.message.id, committer.settled_ids()))
        try:
            if delivery.message.id == "a1":
                # Another partition is not held up behind this one.
                assert b_started.wait(BLOCK_S), "b1 did not run while a1 ran"
        finally:
            with lock:
                running_in_a -= 1
        return None

    handler = FnHandler(TOPIC, run, lane="L")
    worker = Worker(committer, lanes={"L": LaneSettings(concurrency=4)})
    worker.add(handler, subscription)  # type: ignore[arg-type]

    with running(worker):
        wait_until(lambda: len(committer.steps) == 4, message="4 steps settled")

    assert all(isinstance(step.action, Ack) for step in committer.steps), committer.steps
    assert [mid for mid, _ in started] == ["a1", "a2", "a3"]
    assert not overlapped
    # Each starts once its predecessor is settled (its reads see the predecessor's writes).
    assert "a1" in started[1][1]
    assert "a2" in started[2][1]


# --- committing ---------------------------------------------------------------------------------


def _hold_the_commit_thread(queue: MemoryQueue, committer: CountingCommitter) -> None:
    """Publish ``mplug`` and wait until its commit is held: what finishes next waits."""
    committer.hold.clear()
    queue.publish(TOPIC, message("plug"))
    assert committer.holding.wait(BLOCK_S)
    assert committer.calls() == [1]


def test_steps_ready_together_commit_in_one_call(queue: MemoryQueue) -> None:
    handler = FnHandler(TOPIC, lambda d: publishes("out-" + d.message.id), lane="L")
    events = Events()
    committer = CountingCommitter(queue.committer())
    lanes = {"L": LaneSettings(concurrency=16)}
    worker, _ = make_worker(queue, handler, events, lanes=lanes, committer=committer)

    with running(worker):
        _hold_the_commit_thread(queue, committer)
        for i in range(10):
            queue.publish(TOPIC, message(i))
        # A lane job leaves its lane after its step is queued for the commit thread.
        wait_until(
            lambda: len(handler.runs) == 11 and worker.lane_load()["L"] == (0, 0),
            message="10 steps waiting for the commit thread",
        )
        committer.hold.set()
        for i in range(10):
            assert events.wait_outcomes(f"m{i}") == ["ack"]

    assert committer.calls() == [1, 10]
    assert out_ids(queue) == sorted(["out-mplug"] + [f"out-m{i}" for i in range(10)])


@pytest.mark.parametrize("never_dead_letter", [False, True])
def test_a_step_whose_effect_raises_is_split_out_of_its_batch(
    queue: MemoryQueue, clock: ManualClock, never_dead_letter: bool
) -> None:
    def run(delivery: Delivery) -> Effect | None:
        if delivery.message.id != "m3" or delivery.attempt > 1:
            return publishes("out-" + delivery.message.id)

        def bad(outbox: Outbox) -> None:
            outbox.publish("out", Message("out-half-done", b"", "k"))
            raise RuntimeError("the build row could not be written")

        return bad

    handler = FnHandler(TOPIC, run, lane="L", never_dead_letter=never_dead_letter)
    events = Events()
    committer = CountingCommitter(queue.committer())
    worker, _ = make_worker(
        queue, handler, events, lanes={"L": LaneSettings(concurrency=8)}, committer=committer
    )

    with running(worker):
        _hold_the_commit_thread(queue, committer)
        for i in range(1, 6):
            queue.publish(TOPIC, message(i))
        wait_until(lambda: len(handler.runs) == 6 and worker.lane_load()["L"] == (0, 0))
        committer.hold.set()
        for i in (1, 2, 4, 5):
            assert events.wait_outcomes(f"m{i}") == ["ack"]
        failed = "nack" if never_dead_letter else "reject"
        assert events.wait_outcomes("m3") == [failed]
        assert committer.calls()[1] == 5  # they were one batch, then split
        assert out_ids(queue) == ["out-m1", "out-m2", "out-m4", "out-m5", "out-mplug"]
        letters = dead_letters(queue)
        if never_dead_letter:
            assert letters == {}
            clock.advance(1_000)  # its backoff
            assert events.wait_outcomes("m3", 2) == ["nack", "ack"]
            assert handler.runs_of("m3") == [Run("m3", 0, 1), Run("m3", 1, 2)]
        else:
            letter = letters["m3"]
            assert letter is not None
            assert "the build row could not be written" in letter.last_error


def test_transient_commit_failures_are_retried_and_nothing_is_nacked_or_lost(
    queue: MemoryQueue,
) -> None:
    handler = FnHandler(TOPIC, lambda d: publishes("out-" + d.message.id))
    events = Events()
    committer = CountingCommitter(queue.committer())
    committer.failures = 3
    worker, _ = make_worker(queue, handler, events, committer=committer)
    for i in range(5):
        queue.publish(TOPIC, message(i))

    with running(worker):
        for i in range(5):
            assert events.wait_outcomes(f"m{i}") == ["ack"]

    assert len(committer.calls()) >= 4
    assert sorted(handler.runs, key=lambda r: r.message_id) == [
        Run(f"m{i}", 0, 1) for i in range(5)
    ]
    assert out_ids(queue) == [f"out-m{i}" for i in range(5)]
    assert Counter(outcome for _, outcome in events.processed()) == {"ack": 5}


# --- failures -----------------------------------------------------------------------------------


def test_retry_nacks_with_its_delay_and_dead_letters_after_max_attempts(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    def run(delivery: Delivery) -> Effect | None:
        raise Retry("the CI service is flaky", delay_ms=1_000)

    handler = FnHandler(TOPIC, run)
    events = Events()
    settings = dataclasses.replace(FAST, max_attempts=3)
    worker, subscription = make_worker(queue, handler, events, settings=settings)
    queue.publish(TOPIC, message(1))

    with running(worker):
        assert events.wait_outcomes("m1") == ["nack"]
        assert subscription.next_due_ms() == 1_000
        clock.advance(1_000)
        assert events.wait_outcomes("m1", 2) == ["nack"] * 2
        clock.advance(1_000)
        assert events.wait_outcomes("m1", 3) == ["nack"] * 3
        letter = wait_until(lambda: dead_letters(queue).get("m1"))

    assert [(r.retry_count, r.attempt) for r in handler.runs] == [(0, 1), (1, 2), (2, 3)]
    assert letter.failure_count == 3
    assert "the CI service is flaky" in letter.last_error


def test_unprocessable_goes_to_the_dlq_at_once(queue: MemoryQueue) -> None:
    def run(delivery: Delivery) -> Effect | None:
        raise Unprocessable("no such queue")

    handler = FnHandler(TOPIC, run)
    events = Events()
    worker, _ = make_worker(queue, handler, events)
    queue.publish(TOPIC, message(1))

    with running(worker):
        assert events.wait_outcomes("m1") == ["reject"]

    letter = dead_letters(queue)["m1"]
    assert letter is not None
    assert (letter.failure_count, letter.last_error) == (1, "Unprocessable: no such queue")
    assert len(handler.runs) == 1


def test_postpone_defers_without_counting_a_retry(queue: MemoryQueue, clock: ManualClock) -> None:
    def run(delivery: Delivery) -> Effect | None:
        if delivery.attempt == 1:
            raise Postpone("rate limited", 7_000)
        return None

    handler = FnHandler(TOPIC, run)
    events = Events()
    worker, subscription = make_worker(queue, handler, events)
    queue.publish(TOPIC, message(1))

    with running(worker):
        assert events.wait_outcomes("m1") == ["defer"]
        assert subscription.next_due_ms() == 7_000
        clock.advance(7_000)
        assert events.wait_outcomes("m1", 2) == ["defer", "ack"]

    assert handler.runs == [Run("m1", 0, 1), Run("m1", 0, 2)]


def test_the_classifiers_action_is_used_and_none_keeps_the_default(
    queue: MemoryQueue,
) -> None:
    def classify(err: BaseException) -> Action | None:
        if isinstance(err, KeyError):
            return Defer(4_321)
        if isinstance(err, ValueError):
            return Reject("classified as poison")
        return None

    errors: dict[str, Exception] = {
        "m1": KeyError("rate limit"),
        "m2": ValueError("bad payload"),
        "m3": Retry("flaky", delay_ms=60_000),
    }

    def run(delivery: Delivery) -> Effect | None:
        raise errors[delivery.message.id]

    handler = FnHandler(TOPIC, run)
    events = Events()
    worker, subscription = make_worker(queue, handler, events, classify=classify)
    for i in (1, 2, 3):
        queue.publish(TOPIC, message(i))

    with running(worker):
        assert events.wait_outcomes("m1") == ["defer"]
        assert events.wait_outcomes("m2") == ["reject"]
        assert events.wait_outcomes("m3") == ["nack"]
        assert subscription.next_due_ms() == 4_321

    letter = dead_letters(queue)["m2"]
    assert letter is not None and letter.last_error == "classified as poison"


def test_a_lane_job_past_its_call_timeout_is_nacked_and_its_late_result_ignored(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    gate = threading.Event()
    returned = threading.Event()

    def run(delivery: Delivery) -> Effect | None:
        if delivery.message.id == "m1" and delivery.attempt == 1:
            gate.wait(BLOCK_S)
            returned.set()
            return publishes("out-late")
        return None

    handler = FnHandler(TOPIC, run, lane=lambda d: "L" if d.message.id == "m1" else INLINE)
    events = Events()
    lanes = {"L": LaneSettings(concurrency=1, call_timeout_s=0.2)}
    worker, _ = make_worker(queue, handler, events, lanes=lanes)
    queue.publish(TOPIC, message(1))

    with running(worker):
        try:
            assert events.wait_outcomes("m1") == ["nack"]
            assert worker.lane_load()["L"] == (1, 0)  # its slot is taken until it returns
        finally:
            gate.set()
        wait_until(lambda: returned.is_set() and worker.lane_load()["L"] == (0, 0))
        # Whatever the late return queued would be settled before this one.
        queue.publish(TOPIC, message("sentinel"))
        assert events.wait_outcomes("msentinel") == ["ack"]
        assert events.outcomes("m1") == ["nack"]
        assert out_ids(queue) == []

        clock.advance(1_000)  # the nack's backoff
        assert events.wait_outcomes("m1", 2) == ["nack", "ack"]

    assert handler.runs_of("m1") == [Run("m1", 0, 1), Run("m1", 1, 2)]


def test_a_job_whose_claim_was_lost_before_it_started_does_not_run(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    settings = dataclasses.replace(FAST, visibility_timeout_ms=10_000)
    worker, subscription = make_worker(
        queue, handler, events, lanes={"L": LaneSettings(concurrency=1)}, settings=settings
    )
    queue.publish(TOPIC, message(0))
    queue.publish(TOPIC, message(1))

    with running(worker):
        try:
            wait_until(lambda: worker.lane_load()["L"] == (1, 1))
            [waiting] = [d for d in handler.planned if d.message.id == "m1"]
            subscription.abandon([waiting])
        finally:
            gate.set()
        assert events.wait_outcomes("m0") == ["ack"]
        assert events.wait_outcomes("m1") == ["lost"]
        assert handler.runs_of("m1") == []
        clock.advance(10_000)
        assert events.wait_outcomes("m1", 2) == ["lost", "ack"]

    assert handler.runs_of("m1") == [Run("m1", 1, 2)]


# --- stopping and health ------------------------------------------------------------------------


def test_stop_hands_back_jobs_not_started_and_gives_running_ones_the_grace(
    queue: MemoryQueue,
) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    worker, subscription = make_worker(
        queue, handler, events, lanes={"L": LaneSettings(concurrency=1)}
    )
    for i in range(4):
        queue.publish(TOPIC, message(i))
    worker.start()
    wait_until(lambda: worker.lane_load()["L"] == (1, 3))

    stopper = threading.Thread(target=worker.stop, args=(BLOCK_S,))
    stopper.start()
    try:
        for i in (1, 2, 3):
            assert events.wait_outcomes(f"m{i}") == ["handed_back"]
    finally:
        gate.set()
    stopper.join(BLOCK_S + 10)
    assert not stopper.is_alive()

    assert events.outcomes("m0") == ["ack"]  # it finished within the grace
    again = subscription.fetch(10)
    assert sorted((d.message.id, d.retry_count, d.attempt) for d in again) == [
        ("m1", 0, 2),
        ("m2", 0, 2),
        ("m3", 0, 2),
    ]


def test_stop_hands_back_a_job_still_running_after_the_grace(queue: MemoryQueue) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    worker, subscription = make_worker(
        queue, handler, events, lanes={"L": LaneSettings(concurrency=1)}
    )
    queue.publish(TOPIC, message(0))
    queue.publish(TOPIC, message(1))
    worker.start()
    try:
        wait_until(lambda: worker.lane_load()["L"] == (1, 1))
        grace_s = 0.3
        started = time.monotonic()
        worker.stop(grace_s)
        elapsed = time.monotonic() - started
    finally:
        gate.set()

    assert elapsed < grace_s + STOP_BOUND_S
    assert events.outcomes("m0") == ["handed_back"]
    assert events.outcomes("m1") == ["handed_back"]
    again = subscription.fetch(10)
    assert sorted((d.message.id, d.retry_count) for d in again) == [("m0", 0), ("m1", 0)]


def test_stop_returns_within_the_grace_and_a_margin_when_the_committer_keeps_failing(
    queue: MemoryQueue,
) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    committer = CountingCommitter(queue.committer())
    committer.down.set()
    worker, _ = make_worker(
        queue, handler, events, lanes={"L": LaneSettings(concurrency=1)}, committer=committer
    )
    for i in range(3):
        queue.publish(TOPIC, message(i))
    worker.start()
    try:
        wait_until(lambda: worker.lane_load()["L"] == (1, 2))
        grace_s = 0.5
        started = time.monotonic()
        worker.stop(grace_s)
        elapsed = time.monotonic() - started
    finally:
        gate.set()
        committer.down.clear()

    assert elapsed < grace_s + STOP_BOUND_S
    assert committer.calls()  # it did try
    # Nothing was settled, and nothing counted as a failure.
    assert not [o for _, o in events.processed() if o in ("ack", "nack", "reject")]


def test_stop_gives_up_every_claim_it_could_not_settle_when_the_database_hangs(
    queue: MemoryQueue, clock: ManualClock
) -> None:
    gate = threading.Event()
    handler = FnHandler(TOPIC, waits_for(gate), lane="L")
    events = Events()
    committer = CountingCommitter(queue.committer())
    committer.hold.clear()  # a commit call waits on the database, then fails
    committer.down.set()
    settings = dataclasses.replace(FAST, visibility_timeout_ms=10_000)
    worker, subscription = make_worker(
        queue,
        handler,
        events,
        lanes={"L": LaneSettings(concurrency=1)},
        committer=committer,
        settings=settings,
    )
    for i in range(3):
        queue.publish(TOPIC, message(i))
    worker.start()
    try:
        wait_until(lambda: worker.lane_load()["L"] == (1, 2))
        grace_s = 0.5
        started = time.monotonic()
        worker.stop(grace_s)
        assert time.monotonic() - started < grace_s + STOP_BOUND_S
        assert committer.holding.is_set()  # the hand-back of m1, m2 is the call in progress

        clock.advance(10_000)  # every claim stop() could not settle is back by now
        back = subscription.fetch(10)
        assert sorted((d.message.id, d.retry_count) for d in back) == [
            ("m0", 1),
            ("m1", 1),
            ("m2", 1),
        ]
    finally:
        committer.down.clear()
        committer.hold.set()
        gate.set()


def test_health_stays_ok_while_a_lane_is_blocked(queue: MemoryQueue) -> None:
    gate = threading.Event()
    blocked_at: list[float] = []

    def run(delivery: Delivery) -> Effect | None:
        if delivery.message.id == "m0":
            blocked_at.append(time.monotonic())
            gate.wait(BLOCK_S)
        return None

    handler = FnHandler(TOPIC, run, lane=lambda d: "L" if d.message.id == "m0" else INLINE)
    events = Events()
    worker, _ = make_worker(queue, handler, events, lanes={"L": LaneSettings(concurrency=1)})
    queue.publish(TOPIC, message(0))

    with running(worker):
        try:
            wait_until(lambda: blocked_at)
            queue.publish(TOPIC, message(1))
            assert events.wait_outcomes("m1") == ["ack"]
            # The fetch loop ticked after the lane blocked: healthy even judged by that instant.
            assert worker.health(time.monotonic() - blocked_at[0]) == (True, "ok")
            assert worker.lane_load()["L"] == (1, 0)
        finally:
            gate.set()


def test_health_reports_a_fetch_loop_that_stopped_ticking() -> None:
    subscription = ScriptedSubscription(TOPIC, [])
    subscription.fetching.clear()  # the database hangs on the claim
    entered = threading.Event()
    inner_fetch = subscription.fetch

    def fetch(limit: int) -> list:  # type: ignore[type-arg]
        entered.set()
        return inner_fetch(limit)

    subscription.fetch = fetch  # type: ignore[method-assign]
    handler = FnHandler(TOPIC, lambda d: None)
    worker = Worker(RecordingCommitter())
    worker.add(handler, subscription)  # type: ignore[arg-type]

    with running(worker, grace_s=0.1):
        try:
            assert entered.wait(BLOCK_S)
            hung_at = time.monotonic()
            assert worker.health(time.monotonic() - hung_at) == (
                False,
                f"fetch loops stalled: {TOPIC}",
            )
        finally:
            subscription.fetching.set()


@pytest.mark.parametrize(("never_dead_letter", "outcome"), [(False, "reject"), (True, "nack")])
def test_a_plan_that_raises_fails_each_delivery_on_its_own(
    queue: MemoryQueue, never_dead_letter: bool, outcome: str
) -> None:
    class BrokenPlan(FnHandler):
        def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
            raise RuntimeError("a bug in plan")

    handler = BrokenPlan(TOPIC, lambda d: None, never_dead_letter=never_dead_letter)
    events = Events()
    worker, _ = make_worker(queue, handler, events)
    for i in (1, 2):
        queue.publish(TOPIC, message(i))

    with running(worker):
        assert events.wait_outcomes("m1") == [outcome]
        assert events.wait_outcomes("m2") == [outcome]

    expected = set() if never_dead_letter else {"m1", "m2"}
    assert set(dead_letters(queue)) == expected


def test_processed_reports_each_outcome_once(
    queue: MemoryQueue, logs: list[MutableMapping[str, Any]]
) -> None:
    gate = threading.Event()

    def run(delivery: Delivery) -> Effect | None:
        match delivery.message.id:
            case "mnack":
                raise Retry("flaky", delay_ms=60_000)
            case "mreject":
                raise Unprocessable("poison")
            case "mdefer":
                raise Postpone("later", 60_000)
            case "mblocker":
                gate.wait(BLOCK_S)
        return None

    in_lane = {"mblocker", "mhandback"}
    handler = FnHandler(TOPIC, run, lane=lambda d: "L" if d.message.id in in_lane else INLINE)
    events = Events()
    worker, _ = make_worker(queue, handler, events, lanes={"L": LaneSettings(concurrency=1)})
    for name in ("blocker", "handback", "ack", "nack", "reject", "defer"):
        queue.publish(TOPIC, message(name))
    worker.start()
    for name in ("ack", "nack", "reject", "defer"):
        events.wait_outcomes(f"m{name}")
    wait_until(lambda: worker.lane_load()["L"] == (1, 1))

    stopper = threading.Thread(target=worker.stop, args=(BLOCK_S,))
    stopper.start()
    try:
        events.wait_outcomes("mhandback")
    finally:
        gate.set()
    stopper.join(BLOCK_S + 10)

    assert Counter(events.processed()) == {
        ("mblocker", "ack"): 1,
        ("mhandback", "handed_back"): 1,
        ("mack", "ack"): 1,
        ("mnack", "nack"): 1,
        ("mreject", "reject"): 1,
        ("mdefer", "defer"): 1,
    }
    failures = [
        (e["event"], e["message_id"])
        for e in logs
        if e["event"] in ("delivery_nacked", "delivery_rejected")
    ]
    assert sorted(failures) == [("delivery_nacked", "mnack"), ("delivery_rejected", "mreject")]
