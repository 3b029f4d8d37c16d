"""P2 — publish: messages/s, one per call and batched, next to ceiling (a).

``single``: ``queue.publish(topic, message)``, one transaction per message.
``batchN``: ``queue.publish_many(topic, N messages)``, one transaction per call.
The topic has one consumer group, as every topic the daemon uses does, so each message also
writes its delivery row (the fan-out). Messages look like polls: a build id as partition key,
``<build>/poll/<n>`` as id, a ~60-byte payload. Each connection count is measured in rounds
that alternate with ceiling (a) at the same count, so noise hits both alike. Beside them, two
raw-driver shapes of a publish (``bench.shapes``): ``raw_statements`` (today's three round
trips without Python on top: what the SQL design allows) and ``raw_trigger`` (the fan-out in an
AFTER INSERT trigger: one statement, the shape of (a)).
"""

from __future__ import annotations

import itertools
import threading

from bench.ceiling import Ceiling
from bench.databases import Backend
from bench.profiles import Profile
from bench.report import Result, log
from bench.shapes import PublishShapes
from bench.timing import run_threads
from bench.workload import never_finishing_runner
from buildq.orchestrator.chain import poll_message
from buildq.queue.contract import Message
from buildq.queue.settings import SubscriptionSettings
from buildq.queue.sql import SqlQueue

TOPIC = "bench_publish"


def run(backend: Backend, profile: Profile) -> Result:
    ceiling = Ceiling(backend, profile.ceiling_s)
    shapes = PublishShapes(backend, profile.p2_s)
    db = backend.database(pool_size=max(profile.p2_threads) + 2)
    queue = SqlQueue(db)
    queue.unsubscribe(queue.subscribe(TOPIC, "bench", SubscriptionSettings()))  # the group
    build_ids = [never_finishing_runner().trigger("bench", (), ()).id for _ in range(64)]
    serial = itertools.count()
    serial_lock = threading.Lock()

    def messages(count: int) -> list[Message]:
        with serial_lock:
            numbers = [next(serial) for _ in range(count)]
        return [poll_message(build_ids[n % len(build_ids)], n) for n in numbers]

    def single(_index: int) -> int:
        queue.publish(TOPIC, messages(1)[0])
        return 1

    def batched(_index: int) -> int:
        queue.publish_many(TOPIC, messages(profile.p2_batch))
        return profile.p2_batch

    rates: dict[str, list[float]] = {}
    try:
        for n in profile.p2_threads:
            for _ in range(profile.rounds):
                rates.setdefault(f"a_c{n}", []).append(ceiling.insert(n))
                rates.setdefault(f"single_c{n}", []).append(run_threads(n, profile.p2_s, single))
                rates.setdefault(f"batch{profile.p2_batch}_c{n}", []).append(
                    run_threads(n, profile.p2_s, batched)
                )
                rates.setdefault(f"raw_statements_c{n}", []).append(shapes.statements(n))
                rates.setdefault(f"raw_trigger_c{n}", []).append(shapes.trigger(n))
            log(f"p2 {backend.name} connections={n}: {rates}")
    finally:
        db.dispose()
    metrics = {k: sum(v) / len(v) for k, v in rates.items() if not k.startswith("a_c")}
    ceil = {k: sum(v) / len(v) for k, v in rates.items() if k.startswith("a_c")}
    first = profile.p2_threads[0]
    single_ratio = metrics[f"single_c{first}"] / ceil[f"a_c{first}"]
    batch_x = metrics[f"batch{profile.p2_batch}_c{first}"] / metrics[f"single_c{first}"]
    metrics["ratio_single"] = single_ratio
    metrics["ratio_batched"] = metrics[f"batch{profile.p2_batch}_c{first}"] / ceil[f"a_c{first}"]
    metrics["batch_x_single"] = batch_x
    metrics["raw_statements_over_a"] = metrics[f"raw_statements_c{first}"] / ceil[f"a_c{first}"]
    metrics["single_over_raw_statements"] = (
        metrics[f"single_c{first}"] / metrics[f"raw_statements_c{first}"]
    )
    return Result(
        bench="p2",
        backend=backend.name,
        metrics=metrics,
        ceiling=ceil,
        ratio=single_ratio,
        ratio_means=f"single publish / (a), {first} connection(s)",
        target="single >= 0.7 x (a); batched >= 5 x single",
        met=single_ratio >= 0.7 and batch_x >= 5,
        notes={"rounds": rates},
    )
