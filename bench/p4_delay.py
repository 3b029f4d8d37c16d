"""P4 — delay precision: ``publish_after`` at a steady 1,000 msgs/s with random delays.

Four publisher threads publish ``rate`` messages/s between them for the run, each message with
its own delay drawn uniformly from 0–2,000 ms, one transaction per 10 ms tick per thread. On
MariaDB they run in another process (``python -m bench.p4_delay publish …``: another daemon or
a client, not sharing the consumer's GIL); on SQLite in the consumer's process, as one process
per database file is how SQLite is deployed. The consumer is the
daemon's engine (``buildq.queue.worker.Worker``, default settings) in this process; its handler
notes the delivery's ``delivered_at`` (the claim, database clock) and when it starts work, and
the worker acks it. Lateness = ``delivered_at`` − due (the message's ``visible_after``, or its
``created_at`` for a delay of 0), both from the database's clock; ``start_*`` is the handler's
start instead of the claim (local clock moved onto the database's with an offset measured as
``DbClock`` does): what a poll's lateness looks like to the poll loop. Each rate of the profile
runs on a topic of its own: the first is the target (1,000/s); lower ones show the precision
the consumer has when it is not also at its throughput limit.
"""

from __future__ import annotations

import functools
import itertools
import json
import random
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from sqlalchemy import select, text

from bench import ROOT
from bench.databases import Backend
from bench.profiles import Profile
from bench.report import Result, log
from bench.timing import percentile, wait_for
from buildq.queue.contract import Delivery, Message
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue
from buildq.queue.worker import Job, Worker
from buildq.storage.database import Database, create_engine
from buildq.storage.dialect import db_now_ms

TOPIC = "bench_delay"
MAX_DELAY_MS = 2_000
TICK_S = 0.01
TARGET_P99_MS = 100.0
PUBLISHERS = 4
_CALLS = itertools.count()


def publish(
    queue: SqlQueue, topic: str, rate: float, seconds: float, seed: int, offset: int = 0
) -> int:
    """Publish at ``rate``/s for ``seconds``: catch up when behind, at most 50 per commit."""
    rng = random.Random(seed)
    sent = 0
    started = time.monotonic()
    next_tick = started
    while (now := time.monotonic()) - started < seconds:
        due = int((now - started) * rate) - sent
        if due > 0:
            count = min(due, 50)
            with queue.transaction() as tx:
                for i in range(offset + sent, offset + sent + count):
                    message = Message(id=f"m/{i}", payload=b"{}", partition_key=f"p{i % 997}")
                    tx.publish_after(topic, message, rng.randint(0, MAX_DELAY_MS))
            sent += count
        next_tick += TICK_S
        time.sleep(max(0.0, next_tick - time.monotonic()))
    return sent


def publish_threads(queue: SqlQueue, topic: str, rate: int, seconds: float) -> dict[str, Any]:
    """``PUBLISHERS`` threads sharing ``rate``; returns what they sent and the rate reached."""
    sent = [0] * PUBLISHERS
    started = time.monotonic()

    def one(index: int) -> None:
        sent[index] = publish(
            queue, topic, rate / PUBLISHERS, seconds, seed=index, offset=index << 32
        )

    threads = [threading.Thread(target=one, args=(i,)) for i in range(PUBLISHERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"sent": sum(sent), "rate": sum(sent) / (time.monotonic() - started)}


def _publisher_process(url: str, topic: str, rate: int, seconds: float) -> dict[str, Any]:
    """MySQL/MariaDB: publish from another process, as another daemon or a client would."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.p4_delay", "publish", url, topic, str(rate), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


class _Recorder:
    """The handler: notes when the database claimed each message and when work started."""

    renew_claim_first = False
    never_dead_letter = False

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.lock = threading.Lock()
        self.seen: dict[str, tuple[int, float]] = {}

    def plan(self, deliveries: Sequence[Delivery]) -> list[Job]:
        return [Job(d, functools.partial(self.handle, d)) for d in deliveries]

    def handle(self, delivery: Delivery) -> Any:
        now = time.time() * 1000
        with self.lock:
            self.seen.setdefault(delivery.message.id, (delivery.delivered_at_ms, now))
        return None

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def _db_offset_ms(db: Database) -> float:
    """Database clock minus local clock, from the round trip with the smallest delay."""
    best: tuple[float, float] = (float("inf"), 0.0)
    for _ in range(5):
        before = time.time() * 1000
        db_now = db.read(lambda conn: conn.execute(select(db_now_ms())).scalar_one())
        after = time.time() * 1000
        best = min(best, (after - before, float(db_now) - (before + after) / 2))
    return best[1]


def measure(backend: Backend, rate: int, seconds: float) -> dict[str, Any]:
    """Publish at ``rate`` for ``seconds`` into a fresh topic; lateness of every message."""
    topic = f"{TOPIC}_{rate}_{next(_CALLS)}"  # fresh: message ids restart at 0 every call
    db = backend.database(pool_size=12)
    queue = SqlQueue(db)
    sub = queue.subscribe(topic, "bench", SubscriptionSettings(visibility_timeout_ms=120_000))
    recorder = _Recorder(topic)
    consumer = Worker(queue.committer())
    consumer.add(recorder, sub)
    consumer.start()
    try:
        offset_before = _db_offset_ms(db)
        if backend.name == "sqlite":
            # One process per SQLite file: the daemon publishes its own polls.
            published = publish_threads(queue, topic, rate, seconds)
        else:
            published = _publisher_process(backend.url, topic, rate, seconds)
        wait_for(lambda: recorder.count() >= published["sent"], MAX_DELAY_MS / 1000 + 30)
        offset = (offset_before + _db_offset_ms(db)) / 2
    finally:
        consumer.stop(grace_s=5)
        queue.unsubscribe(sub)
    due: dict[str, int] = dict(
        db.read(
            lambda conn: conn.execute(
                text(
                    "SELECT message_id, CASE WHEN visible_after > 0 THEN visible_after"
                    " ELSE created_at END FROM queue_messages WHERE topic = :t"
                ),
                {"t": topic},
            ).all()
        )
    )
    db.dispose()
    claimed = [c - due[mid] for mid, (c, _) in recorder.seen.items() if c]
    started = [s + offset - due[mid] for mid, (_, s) in recorder.seen.items()]
    figures = {
        "rate": published["rate"],
        "late_p50_ms": percentile(claimed, 50),
        "late_p99_ms": percentile(claimed, 99),
        "late_max_ms": max(claimed, default=float("nan")),
        "start_p50_ms": percentile(started, 50),
        "start_p99_ms": percentile(started, 99),
        "missing": published["sent"] - len(started),
        "early": sum(1 for x in claimed if x < 0),
        "clock_offset_ms": offset,
    }
    log(f"p4 {backend.name} at {rate}/s: {figures}")
    return figures


def run(backend: Backend, profile: Profile) -> Result:
    metrics: dict[str, Any] = {}
    notes: dict[str, Any] = {}
    for rate in profile.p4_rates:
        figures = measure(backend, rate, profile.p4_s)
        notes[f"at_{rate}"] = figures
        for key in ("rate", "late_p50_ms", "late_p99_ms", "late_max_ms", "start_p99_ms"):
            metrics[f"{key}@{rate}"] = figures[key]
    target = profile.p4_rates[0]
    at_target = notes[f"at_{target}"]
    return Result(
        bench="p4",
        backend=backend.name,
        metrics=metrics,
        ceiling={},
        ratio=at_target["late_p99_ms"] / TARGET_P99_MS,
        ratio_means=f"lateness p99 at {target} msgs/s / the 100 ms target (<= 1 is on target)",
        target=f"p99 <= 100 ms at {target} msgs/s",
        met=at_target["late_p99_ms"] <= TARGET_P99_MS
        and at_target["missing"] == 0
        and at_target["rate"] >= 0.95 * target,
        notes=notes,
    )


if __name__ == "__main__" and sys.argv[1:2] == ["publish"]:
    _db = Database(create_engine(sys.argv[2], pool_size=PUBLISHERS))
    _result = publish_threads(SqlQueue(_db), sys.argv[3], int(sys.argv[4]), float(sys.argv[5]))
    _db.dispose()
    print(json.dumps(_result), flush=True)
