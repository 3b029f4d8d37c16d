"""P1 — the poll cycle: fetch → ``sim`` status → ``publish_after`` next poll + ack, committed.

``builds`` partitions (sim builds that never finish) each hold one live poll message; every
cycle asks the runner for the build's status and hands off to the next poll (``<build>/poll/<n+1>``,
due 0–500 ms later) in one transaction, so the topic keeps a steady set of due work and the
fetch index a steady size. Two ways to drive it:

- ``worker``: the queue's engine (``buildq.queue.worker.Worker`` with ``SqlQueue.committer()``):
  what ``buildq run`` does, minus the build store (P5 measures the whole daemon). The cycle
  does no I/O, so it runs on the fetcher's thread; every cycle ready at once commits in one
  batch of a fixed number of statements. Measured once per round (it has no thread count).
- ``api``: the queue's single-delivery API with a minimal driver (one fetcher thread, N workers,
  one transaction per cycle: publish_after + ack): the unbatched cost, at 1, 4 and 16 threads.

Each round measures ceiling (b) at 1, 4 and 16 connections, then every mode, so noise on the
shared machine hits ceiling and figure alike; figures are means over the rounds.
``cpu_<mode>`` is this process's CPU time per cycle: a figure the noise barely moves.
"""

from __future__ import annotations

import functools
import os
import queue as stdlib_queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

from bench.ceiling import Ceiling
from bench.databases import Backend
from bench.profiles import Profile
from bench.profiling import recording
from bench.report import Result, log
from bench.timing import Counter
from bench.workload import never_finishing_runner
from buildq.buildrunner import BuildID
from buildq.buildrunner.sim import SimRunner
from buildq.orchestrator.chain import poll_message, poll_number
from buildq.queue.contract import Delivery, Message, Outbox
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription, SqlTransaction
from buildq.queue.worker import Job, Worker

TOPIC = "bench_poll"
GROUP = "bench"
MAX_DELAY_MS = 500
SETTINGS = SubscriptionSettings(slots=64, poll_interval_ms=50, visibility_timeout_ms=120_000)


def seed_builds(queue: SqlQueue, runner: SimRunner, topic: str, builds: int) -> list[str]:
    """Trigger ``builds`` sim builds and publish each one's first poll, due now."""
    ids = [runner.trigger("bench", (), ()).id for _ in range(builds)]
    for start in range(0, len(ids), 1_000):
        chunk = ids[start : start + 1_000]
        queue.publish_many(topic, [poll_message(build_id, 1) for build_id in chunk])
    return ids


@dataclass(frozen=True)
class Step:
    """One cycle's decision: publish ``message`` after ``delay_ms`` (the ack's effect)."""

    topic: str
    message: Message
    delay_ms: int

    def __call__(self, outbox: Outbox | SqlTransaction) -> None:
        outbox.publish_after(self.topic, self.message, self.delay_ms)


class PollCycle:
    """What one poll does to one delivery: ask the runner, then hand off to the next poll."""

    def __init__(self, runner: SimRunner, topic: str, rng: random.Random) -> None:
        self.runner = runner
        self.topic = topic
        self.rng = rng

    def decide(self, delivery: Delivery) -> Step:
        build_id = BuildID.from_bytes(delivery.message.payload)
        status, _metadata = self.runner.status(build_id)
        assert not status.is_terminal
        n = poll_number(delivery, 0)
        return Step(self.topic, poll_message(build_id.id, n + 1), self.rng.randint(0, MAX_DELAY_MS))


# --- the engine ------------------------------------------------------------------------------


class _PollHandler:
    """The cycle as a worker handler: every job runs inline (the sim answers at once)."""

    renew_claim_first = False
    never_dead_letter = False

    def __init__(self, cycle: PollCycle) -> None:
        self.topic = cycle.topic
        self.cycle = cycle

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        return [Job(d, functools.partial(self.cycle.decide, d)) for d in deliveries]


def run_worker(
    queue: SqlQueue, sub: SqlSubscription, cycle: PollCycle, seconds: float, pyspy: str | None
) -> dict[str, Any]:
    """Cycles/s through the engine, and deliveries settled per commit."""
    done = Counter()
    batches = Counter()

    def on_event(event: str, **data: Any) -> None:
        if event == "processed" and data.get("outcome") == "ack":
            done.add()

    committer = queue.committer()
    commit = committer.commit

    def counted_commit(steps: Sequence[Any]) -> Any:
        batches.add()
        return commit(steps)

    committer.commit = counted_commit  # type: ignore[method-assign]
    worker = Worker(committer, on_event=on_event)
    worker.add(_PollHandler(cycle), sub)
    worker.start()
    try:
        before = batches.value, done.value
        rate, profiled = _window_rate(done, seconds, pyspy)
        per_commit = (done.value - before[1]) / max(1, batches.value - before[0])
    finally:
        worker.stop(grace_s=10)
    return {
        "rate": rate,
        "per_commit": per_commit,
        "cpu_ms_per_cycle": profiled.pop("cpu_ms_per_cycle"),
        "py-spy": profiled,
    }


# --- the minimal driver ----------------------------------------------------------------------


class Driver:
    """One fetcher thread and ``threads`` workers; each worker commits ``group`` cycles at once."""

    def __init__(
        self,
        queue: SqlQueue,
        sub: SqlSubscription,
        cycle: PollCycle,
        *,
        threads: int,
        group: int,
        batch: int = 64,
        hand_off: Callable[[SqlTransaction, Sequence[Delivery], list[Step]], None] | None = None,
    ) -> None:
        self.queue = queue
        self.sub = sub
        self.cycle = cycle
        self.threads = threads
        self.group = group
        self.batch = batch
        self.hand_off = hand_off or _hand_off_each
        self.done = Counter()
        self.fetches = Counter()
        self.fetched = Counter()
        self._work: stdlib_queue.SimpleQueue[list[Delivery] | None] = stdlib_queue.SimpleQueue()
        self._room = threading.Condition()
        self._inflight = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []

    def start(self) -> Driver:
        self._spawn(self._fetch_loop, "fetch")
        for index in range(self.threads):
            self._spawn(self._work_loop, f"worker-{index}")
        return self

    def stop(self) -> None:
        self._stop.set()
        with self._room:
            self._room.notify_all()
        for _ in range(self.threads):
            self._work.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        leftover = []
        while True:
            try:
                chunk = self._work.get_nowait()
            except stdlib_queue.Empty:
                break
            if chunk:
                leftover.extend(chunk)
        self.sub.hand_back(leftover)

    def _spawn(self, target: Callable[[], None], name: str) -> None:
        thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as err:
            self.errors.append(err)
            self._stop.set()

    def _fetch_loop(self) -> None:
        limit = self.batch * 2
        while not self._stop.is_set():
            with self._room:
                while self._inflight >= limit and not self._stop.is_set():
                    self._room.wait(0.5)
                room = limit - self._inflight
            if self._stop.is_set():
                return
            deliveries = self.sub.fetch(min(self.batch, room))
            self.fetches.add()
            self.fetched.add(len(deliveries))
            if not deliveries:
                self.sub.wait(0.002)
                continue
            with self._room:
                self._inflight += len(deliveries)
            for start in range(0, len(deliveries), self.group):
                self._work.put(list(deliveries[start : start + self.group]))

    def _work_loop(self) -> None:
        while True:
            chunk = self._work.get()
            if chunk is None:
                return
            if self._stop.is_set():
                self.sub.hand_back(chunk)
            else:
                effects = [self.cycle.decide(d) for d in chunk]
                self.queue.run_in_transaction(_bound(self.hand_off, chunk, effects))
                self.done.add(len(chunk))
            with self._room:
                self._inflight -= len(chunk)
                self._room.notify_all()


def _bound(
    hand_off: Callable[[SqlTransaction, Sequence[Delivery], list[Step]], None],
    chunk: Sequence[Delivery],
    steps: list[Step],
) -> Callable[[SqlTransaction], None]:
    """``hand_off`` of this chunk, for ``run_in_transaction`` (which may run it again)."""
    return lambda tx: hand_off(tx, chunk, steps)


def _hand_off_each(tx: SqlTransaction, chunk: Sequence[Delivery], steps: list[Step]) -> None:
    """Today's API: each cycle's publish_after and ack, all in the caller's one transaction."""
    for delivery, step in zip(chunk, steps, strict=True):
        step(tx)
        tx.ack(delivery)


def run_driver(
    queue: SqlQueue,
    sub: SqlSubscription,
    cycle: PollCycle,
    threads: int,
    seconds: float,
    group: int,
    hand_off: Any = None,
    pyspy: str | None = None,
) -> dict[str, Any]:
    driver = Driver(queue, sub, cycle, threads=threads, group=group, hand_off=hand_off).start()
    try:
        rate, profiled = _window_rate(driver.done, seconds, pyspy)
    finally:
        driver.stop()
    if driver.errors:
        raise driver.errors[0]
    per_fetch = driver.fetched.value / max(1, driver.fetches.value)
    return {
        "rate": rate,
        "per_fetch": per_fetch,
        "cpu_ms_per_cycle": profiled.pop("cpu_ms_per_cycle"),
        "py-spy": profiled,
    }


def _window_rate(
    counter: Counter, seconds: float, pyspy: str | None, warmup_s: float = 0.4
) -> tuple[float, dict[str, Any]]:
    """Rate of ``counter`` over ``seconds`` after a warm-up; with ``pyspy``, profiled."""
    time.sleep(warmup_s)
    before, started, cpu = counter.value, time.monotonic(), time.process_time()
    spying: AbstractContextManager[dict[str, Any]] = (
        recording(os.getpid(), seconds, pyspy) if pyspy else nullcontext({})
    )
    with spying as summary:
        time.sleep(seconds)
        done = counter.value - before
        rate = done / (time.monotonic() - started)
    summary = {**summary, "cpu_ms_per_cycle": (time.process_time() - cpu) * 1000 / max(1, done)}
    return rate, summary


# --- the benchmark -------------------------------------------------------------------------------


class Workload:
    """A database with a topic of cycling polls, and a subscription to drive it."""

    def __init__(self, backend: Backend, builds: int, pool_size: int = 24) -> None:
        self.db = backend.database(pool_size=pool_size)
        self.queue = SqlQueue(self.db)
        self.runner = never_finishing_runner()
        self.sub = self.queue.subscribe(TOPIC, GROUP, SETTINGS)
        seed_builds(self.queue, self.runner, TOPIC, builds)
        self.cycle = PollCycle(self.runner, TOPIC, random.Random(7))

    def close(self) -> None:
        self.queue.unsubscribe(self.sub)
        self.db.dispose()


def run(backend: Backend, profile: Profile) -> Result:
    ceiling = Ceiling(backend, profile.ceiling_s)
    work = Workload(backend, profile.p1_builds)
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    notes: dict[str, Any] = {}

    def spy(mode: str) -> str | None:
        return f"p1-{backend.name}-{mode}" if profile.pyspy else None

    def record(key: str, figures: dict[str, Any]) -> None:
        rates.setdefault(key, []).append(figures["rate"])
        notes.setdefault(key, []).append(figures)
        log(f"p1 {backend.name} {key}: {_brief(figures)}")

    try:
        for _ in range(profile.rounds):
            for n in profile.p1_threads:
                rates.setdefault(f"b_c{n}", []).append(ceiling.txn(n))
            figures = run_worker(work.queue, work.sub, work.cycle, profile.p1_s, spy("worker"))
            record("worker", figures)
            cpu.setdefault("cpu_worker", []).append(figures["cpu_ms_per_cycle"])
            for n in profile.p1_threads:
                figures = run_driver(
                    work.queue, work.sub, work.cycle, n, profile.p1_s, 1, pyspy=spy(f"api{n}")
                )
                record(f"api_t{n}", figures)
                if n == 1:
                    cpu.setdefault("cpu_api_t1", []).append(figures["cpu_ms_per_cycle"])
    finally:
        work.close()
    metrics = {k: sum(v) / len(v) for k, v in rates.items() if not k.startswith("b_c")}
    ceil = {k: sum(v) / len(v) for k, v in rates.items() if k.startswith("b_c")}
    metrics |= {key: sum(values) / len(values) for key, values in cpu.items()}
    notes["rounds"] = rates
    unbatched = max(metrics[f"api_t{n}"] / ceil[f"b_c{n}"] for n in profile.p1_threads)
    # The engine against the strongest ceiling measured: (b) at the most connections.
    batched = metrics["worker"] / max(ceil.values())
    metrics["ratio_unbatched"] = unbatched
    metrics["ratio_batched"] = batched
    return Result(
        bench="p1",
        backend=backend.name,
        metrics=metrics,
        ceiling=ceil,
        ratio=batched,
        ratio_means="the engine's cycles/s / the best (b) measured (any connection count)",
        target="batched (the engine) > 1 x (b); unbatched (api) >= 0.6 x (b)",
        met=batched > 1.0,
        notes=notes,
    )


def _brief(figures: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in figures.items()
        if k != "py-spy" or v
    )
