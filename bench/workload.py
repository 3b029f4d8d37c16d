"""Builds for the daemon benchmarks: stored builds, each with its one live poll message.

Seeding writes what the build controller would have written after triggering (a ``builds``
row, ACCEPTED, and the first poll ``<build>/poll/1`` on ``buildsignal``) without going through
the controller, so a benchmark starts from N builds in flight in seconds.
"""

from __future__ import annotations

import json
import random
from collections import defaultdict

from sqlalchemy import insert, select

from buildq.buildrunner import BuildStatus
from buildq.buildrunner.sim import SimConfig, SimProfile, SimRunner, Span
from buildq.orchestrator import topics
from buildq.orchestrator.chain import poll_message
from buildq.orchestrator.schema import builds
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database
from buildq.storage.dialect import db_now_ms

#: The sim runner table of daemon configs whose builds never finish.
FOREVER_RUNNER = """
[runners.sim]
type = "sim"
accepted_s = 0.0
running_s = 86400.0
failure_probability = 0.0
"""


def never_finishing_runner() -> SimRunner:
    """The same runner in-process: sim builds that stay RUNNING for a day."""
    profile = SimProfile(Span(0.0, 0.0), Span(86_400.0, 86_400.0), failure_probability=0.0)
    return SimRunner(SimConfig(default=profile, seed=1))


def seed_builds(
    db: Database,
    queue: SqlQueue,
    count: int,
    *,
    first_poll_ms: tuple[int, int],
    queue_name: str = "bench",
    prefix: str = "seed",
    rng: random.Random | None = None,
) -> list[str]:
    """``count`` sim builds in flight, each first polled in ``first_poll_ms`` (uniform, ms).

    Delays are drawn per build and rounded to 100 ms buckets (one batched publish per bucket).
    """
    rng = rng or random.Random(11)
    runner = never_finishing_runner()
    ids = [runner.trigger(queue_name, (), ()).id for _ in range(count)]
    now = int(db.read(lambda conn: conn.execute(select(db_now_ms())).scalar_one()))
    rows = [
        {
            "request_id": f"{prefix}-{i}",
            "build_id": build_id,
            "queue": queue_name,
            "runner": "sim",
            "status": BuildStatus.ACCEPTED.value,
            "metadata": "{}",
            "request_metadata": "{}",
            "changes": json.dumps({"base": [], "head": [{"id": f"c-{i}", "revision": "r1"}]}),
            "polls": 0,
            "created_at": now,
            "updated_at": now,
        }
        for i, build_id in enumerate(ids)
    ]
    for start in range(0, len(rows), 1_000):
        _insert_builds(db, rows[start : start + 1_000])
    buckets: dict[int, list[str]] = defaultdict(list)
    low, high = first_poll_ms
    for build_id in ids:
        # >= 1 ms: publish_after(0) is a plain publish, whose visible_after is 0, not a time.
        buckets[max(1, rng.randint(low, high) // 100 * 100)].append(build_id)
    for delay, members in sorted(buckets.items()):
        for start in range(0, len(members), 1_000):
            batch = members[start : start + 1_000]
            queue.publish_many(
                topics.BUILDSIGNAL, [poll_message(build_id, 1) for build_id in batch], delay
            )
    return ids


def poll_every(interval_s: float, *, jitter: float = 0.1) -> str:
    """A ``[poll]`` table: every build polled every ``interval_s``, no growth, no deadlines."""
    return f"""
[poll]
accepted_interval_s = {interval_s}
running_interval_s = {interval_s}
growth = 1.0
max_interval_s = {interval_s}
jitter = {jitter}
start_by_s = 0
finish_by_s = 0

[queues.bench]
runner = "sim"
"""


def _insert_builds(db: Database, rows: list[dict[str, object]]) -> None:
    db.write(lambda conn: conn.execute(insert(builds), rows))
