"""Group commit: concurrent steps share a transaction; a spoiled batch falls back to one each."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from buildq.orchestrator.commit import GroupCommitter
from buildq.queue import Message
from buildq.queue.sql import SqlQueue
from tests.queue.conftest import queue, subscribe  # noqa: F401 (fixtures)
from tests.queue.test_publish import msg
from tests.support import wait_until


class Recorder:
    """The daemon's two step runners, on the test queue, remembering transaction sizes; the
    first transaction waits for ``release`` so the test can line the others up behind it."""

    def __init__(self, queue: SqlQueue) -> None:  # noqa: F811
        self.queue = queue
        self.sizes: list[int] = []
        self.first = threading.Event()
        self.release = threading.Event()

    def run_batch(self, steps: Sequence[tuple[Any, Any]]) -> None:
        if not self.first.is_set():
            self.first.set()
            self.release.wait(30)

        def body(tx: Any) -> None:
            for delivery, effect in steps:
                if effect is not None:
                    effect(tx)
                tx.ack(delivery)

        self.queue.run_in_transaction(body)
        self.sizes.append(len(steps))

    def run_one(self, delivery: Any, effect: Any) -> None:
        self.run_batch([(delivery, effect)])


def _run_all(
    committer: GroupCommitter, recorder: Recorder, steps: list[tuple[Any, Callable[..., None]]]
) -> dict[str, BaseException]:
    errors: dict[str, BaseException] = {}

    def worker(delivery: Any, effect: Callable[..., None]) -> None:
        try:
            committer(delivery, effect)
        except BaseException as err:  # handed back to this caller by the committer
            errors[delivery.message.id] = err

    threads = [threading.Thread(target=worker, args=step) for step in steps]
    threads[0].start()
    wait_until(recorder.first.is_set, timeout=10)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: committer._inbox.qsize() == len(steps) - 1, timeout=10)
    recorder.release.set()
    for thread in threads:
        thread.join(timeout=30)
    committer.close()
    return errors


def _publish_next(delivery: Any) -> Callable[[Any], None]:
    return lambda tx: tx.publish("next", msg(delivery.message.id + "/next"))


def _published(queue: SqlQueue) -> list[str]:  # noqa: F811
    return sorted(s.message.id for s in queue.store.fetch_by_offset("next", "p", 0, 2**62, 100))


def test_steps_waiting_together_commit_in_one_transaction(queue, subscribe):  # noqa: F811
    sub = subscribe("t")
    queue.publish_many("t", [msg(f"m{i}", key=f"k{i}") for i in range(12)])
    deliveries = sub.fetch(12)
    recorder = Recorder(queue)
    committer = GroupCommitter(recorder.run_batch, recorder.run_one)
    errors = _run_all(committer, recorder, [(d, _publish_next(d)) for d in deliveries])
    assert errors == {}
    assert recorder.sizes == [1, 11]
    assert _published(queue) == sorted(f"m{i}/next" for i in range(12))
    assert sub.fetch(12) == []  # every delivery acked


def test_a_failing_step_fails_alone_and_rolls_back_alone(queue, subscribe):  # noqa: F811
    sub = subscribe("t")
    queue.publish_many("t", [msg(f"m{i}", key=f"k{i}") for i in range(6)])
    deliveries = sub.fetch(6)
    recorder = Recorder(queue)
    committer = GroupCommitter(recorder.run_batch, recorder.run_one)

    def bad(tx: Any) -> None:
        tx.publish("t", Message(id="never", payload=b"", partition_key="x"))
        raise RuntimeError("this step fails")

    steps = [(d, bad if d.message.id == "m3" else _publish_next(d)) for d in deliveries]
    errors = _run_all(committer, recorder, steps)
    assert list(errors) == ["m3"] and isinstance(errors["m3"], RuntimeError)
    assert _published(queue) == sorted(f"m{i}/next" for i in range(6) if i != 3)
    assert queue.store.fetch_by_offset("t", "x", 0, 2**62) == []  # its publish rolled back
    assert recorder.sizes == [1, 1, 1, 1, 1]  # the spoiled batch of 5 split into 4 + the bad one


def test_a_single_step_error_reaches_its_caller(queue, subscribe):  # noqa: F811
    sub = subscribe("t")
    queue.publish("t", msg("only"))
    [delivery] = sub.fetch(1)
    recorder = Recorder(queue)
    recorder.first.set()  # no line-up here
    committer = GroupCommitter(recorder.run_batch, recorder.run_one)

    def fail(tx: Any) -> None:
        raise ValueError("nope")

    with pytest.raises(ValueError, match="nope"):
        committer(delivery, fail)
    committer(delivery, None)  # still open after the rollback: it can be settled afterwards
    committer.close()
    assert sub.fetch(1) == []


def test_a_step_after_close_commits_at_once_instead_of_waiting(queue, subscribe):  # noqa: F811
    sub = subscribe("t")
    queue.publish("t", msg("late"))
    [delivery] = sub.fetch(1)
    recorder = Recorder(queue)
    recorder.first.set()
    committer = GroupCommitter(recorder.run_batch, recorder.run_one)
    committer.close()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (committer(delivery, None), done.set()))
    worker.start()
    worker.join(timeout=30)
    assert done.is_set(), "a step submitted after close must not wait for the gone thread"
    assert sub.fetch(1) == []  # and it was committed: the delivery is acked
    assert committer.alive  # closed on purpose is not a fault


def test_a_dead_batching_thread_shows_as_not_alive(queue):  # noqa: F811
    recorder = Recorder(queue)
    committer = GroupCommitter(recorder.run_batch, recorder.run_one)
    assert committer.alive
    committer._inbox.put(None)  # the thread ends while the committer is still open
    wait_until(lambda: not committer.alive, timeout=10)
