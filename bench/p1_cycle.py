"""P1 — the poll cycle: fetch → ``sim`` status → ``publish_after`` next poll + ack, committed.

``builds`` partitions (sim builds that never finish) each hold one live poll message; every
cycle asks the runner for the build's status and hands off to the next poll (``<build>/poll/<n+1>``,
due 0–500 ms later) in one transaction, so the topic keeps a steady set of due work and the
fetch index a steady size. Three ways to drive it, each with 1, 4 and 16 worker threads:

- ``fw``: the daemon's consumer framework (``Consumer``: one fetcher, partition-ordered
  workers, one transaction per delivery) — what ``buildq run`` does today, minus the build
  store (P5 measures the whole daemon).
- ``api``: the same through the queue API with a minimal driver (one fetcher thread, workers,
  one transaction per delivery): the framework's own overhead is ``api`` minus ``fw``.
- ``batchG``: the minimal driver, G cycles per transaction (G × publish_after + G × ack, one
  COMMIT): what a batched hand-off in the framework would get with today's queue API.

Each thread count runs ``rounds`` rounds, each measuring ceiling (b) at the same number of
connections and then every mode, so noise on the shared machine hits ceiling and figure alike;
figures are means over the rounds. ``cpu_<mode>_t1`` is this process's CPU time per cycle with
one worker: a figure the noise barely moves, and the one to compare between runs.
"""

from __future__ import annotations

import os
import queue as stdlib_queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from bench.ceiling import Ceiling
from bench.common import Backend, Counter, Profile, Result, log
from bench.profiling import recording
from bench.workload import never_finishing_runner
from buildq.buildrunner import BuildID
from buildq.buildrunner.sim import SimRunner
from buildq.orchestrator.controllers import poll_message, poll_number
from buildq.orchestrator.framework import Consumer
from buildq.queue.contract import Delivery, Message
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription, SqlTransaction

TOPIC = "bench_poll"
GROUP = "bench"
MAX_DELAY_MS = 500
SETTINGS = SubscriptionSettings(
    slots=64, batch_size=64, poll_interval_ms=50, visibility_timeout_ms=120_000
)


def seed_builds(queue: SqlQueue, runner: SimRunner, topic: str, builds: int) -> list[str]:
    """Trigger ``builds`` sim builds and publish each one's first poll, due now."""
    ids = [runner.trigger("bench", (), ()).id for _ in range(builds)]
    for start in range(0, len(ids), 1_000):
        chunk = ids[start : start + 1_000]
        queue.publish_many(topic, [poll_message(build_id, 1) for build_id in chunk])
    return ids


@dataclass(frozen=True)
class Step:
    """One cycle's decision: publish ``message`` after ``delay_ms`` (an effect for the framework)."""

    topic: str
    message: Message
    delay_ms: int

    def __call__(self, tx: SqlTransaction) -> None:
        tx.publish_after(self.topic, self.message, self.delay_ms)


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


# --- the framework -------------------------------------------------------------------------


class _PollController:
    def __init__(self, cycle: PollCycle) -> None:
        self.topic = cycle.topic
        self.cycle = cycle

    def handle(self, delivery: Delivery) -> Any:
        return self.cycle.decide(delivery)


def run_framework(
    queue: SqlQueue,
    sub: SqlSubscription,
    cycle: PollCycle,
    threads: int,
    seconds: float,
    pyspy: str | None = None,
) -> dict[str, Any]:
    """Cycles/s through the daemon's ``Consumer`` with ``threads`` workers."""
    done = Counter()

    def step(delivery: Delivery, effect: Any) -> None:
        def run(tx: SqlTransaction) -> None:
            if effect is not None:
                effect(tx)
            tx.ack(delivery)

        queue.run_in_transaction(run)

    def on_event(event: str, **data: Any) -> None:
        if event == "processed" and data.get("outcome") == "ack":
            done.add()

    fetches, fetched = Counter(), Counter()
    fetch = sub.fetch

    def counted_fetch(limit: int) -> list[Any]:
        deliveries = fetch(limit)
        fetches.add()
        fetched.add(len(deliveries))
        return deliveries

    sub.fetch = counted_fetch  # type: ignore[method-assign]
    consumer = Consumer(step, workers=threads, on_event=on_event)
    consumer.add(_PollController(cycle), sub)
    consumer.start()
    try:
        rate, profiled = _window_rate(done, seconds, pyspy)
    finally:
        consumer.stop(grace_s=10)
        del sub.fetch
    return {
        "rate": rate,
        "per_fetch": fetched.value / max(1, fetches.value),
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
                self.queue.run_in_transaction(
                    lambda tx, chunk=chunk, effects=effects: self.hand_off(tx, chunk, effects)
                )
                self.done.add(len(chunk))
            with self._room:
                self._inflight -= len(chunk)
                self._room.notify_all()


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
    with recording(os.getpid(), seconds, pyspy) if pyspy else nullcontext({}) as summary:
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
    metrics: dict[str, float] = {}
    ceil: dict[str, float] = {}
    notes: dict[str, Any] = {}

    def spy(mode: str, n: int) -> str | None:
        return f"p1-{backend.name}-{mode}-t{n}" if profile.pyspy else None

    modes: list[tuple[str, Callable[[int], dict[str, Any]]]] = [
        (
            "fw",
            lambda n: run_framework(
                work.queue, work.sub, work.cycle, n, profile.p1_s, spy("fw", n)
            ),
        )
    ]
    if profile.name == "full":
        modes.append(
            (
                "api",
                lambda n: run_driver(
                    work.queue, work.sub, work.cycle, n, profile.p1_s, 1, pyspy=spy("api", n)
                ),
            )
        )
    for group in profile.p1_groups:
        modes.append(
            (
                f"batch{group}",
                lambda n, g=group: run_driver(
                    work.queue, work.sub, work.cycle, n, profile.p1_s, g, pyspy=spy(f"b{g}", n)
                ),
            )
        )
    rates: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    try:
        for n in profile.p1_threads:
            for _ in range(profile.rounds):
                rates.setdefault(f"b_c{n}", []).append(ceiling.txn(n))
                for mode, measure in modes:
                    figures = measure(n)
                    rates.setdefault(f"{mode}_t{n}", []).append(figures["rate"])
                    if n == 1:
                        cpu.setdefault(f"cpu_{mode}_t1", []).append(figures["cpu_ms_per_cycle"])
                    notes.setdefault(f"{mode}_t{n}", []).append(figures)
                    log(f"p1 {backend.name} {mode} threads={n}: {_brief(figures)}")
    finally:
        work.close()
    for key, values in rates.items():
        (ceil if key.startswith("b_c") else metrics)[key] = sum(values) / len(values)
    metrics |= {key: sum(values) / len(values) for key, values in cpu.items()}
    notes["rounds"] = rates
    unbatched = max(metrics[f"fw_t{n}"] / ceil[f"b_c{n}"] for n in profile.p1_threads)
    batched = max(
        metrics[f"batch{g}_t{n}"] / ceil[f"b_c{n}"]
        for g in profile.p1_groups
        for n in profile.p1_threads
    )
    metrics["ratio_unbatched"] = unbatched
    metrics["ratio_batched"] = batched
    return Result(
        bench="p1",
        backend=backend.name,
        metrics=metrics,
        ceiling=ceil,
        ratio=unbatched,
        ratio_means="best over thread counts of fw_tN / (b) at N connections",
        target="unbatched >= 0.6 x (b); batched > 1 x (b)",
        met=unbatched >= 0.6 and batched > 1.0,
        notes=notes,
    )


def _brief(figures: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in figures.items()
        if k != "py-spy" or v
    )
