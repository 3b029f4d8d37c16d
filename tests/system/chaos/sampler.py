"""The invariants a chaos run samples from the database while the faults happen.

Every few hundred ms, in one REPEATABLE READ snapshot, through a connection of the test's own:

- every unfinished build has at most one live ``buildsignal`` delivery, and at least one live
  ``buildsignal`` or ``buildsignal_dlq`` delivery (a dead letter waiting for its reconciler
  still carries the build: nothing is silently dropped from the loop);
- no finished build has a live poll (a stray chain);
- every submitted request is either stored as a build or still carried by a live ``build``
  or ``build_dlq`` delivery.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import sqlalchemy as sa

from buildq.orchestrator import topics

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
GROUP = topics.GROUP

#: Names the statements use (bound, never pasted into the SQL).
NAMES = {
    "grp": GROUP,
    "build": topics.BUILD,
    "build_dlq": topics.BUILD_DLQ,
    "signal": topics.BUILDSIGNAL,
    "signal_dlq": topics.BUILDSIGNAL_DLQ,
    "result": topics.BUILDRESULT,
}

SAMPLE_UNFINISHED = sa.text("""
SELECT b.build_id, b.status,
       (SELECT COUNT(*) FROM queue_messages m
          JOIN queue_deliveries d ON d.seq = m.seq AND d.grp = :grp
         WHERE m.topic = :signal AND m.partition_key = b.build_id) AS live,
       (SELECT COUNT(*) FROM queue_messages m
          JOIN queue_deliveries d ON d.seq = m.seq AND d.grp = :grp
         WHERE m.topic = :signal_dlq AND m.partition_key = b.build_id) AS dead
  FROM builds b
 WHERE b.build_id IS NOT NULL AND b.status NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')
""")

SAMPLE_STRAY = sa.text("""
SELECT m.partition_key, m.message_id, b.status
  FROM queue_deliveries d
  JOIN queue_messages m ON m.seq = d.seq
  LEFT JOIN builds b ON b.build_id = m.partition_key
 WHERE d.grp = :grp AND d.topic = :signal
   AND (b.build_id IS NULL OR b.status IN ('SUCCEEDED', 'FAILED', 'CANCELLED'))
""")

SAMPLE_UNCARRIED_REQUESTS = sa.text("""
SELECT m.partition_key
  FROM queue_messages m
 WHERE m.topic = :build
   AND NOT EXISTS (SELECT 1 FROM builds b WHERE b.request_id = m.partition_key)
   AND NOT EXISTS (SELECT 1 FROM queue_deliveries d WHERE d.seq = m.seq AND d.grp = :grp)
   AND NOT EXISTS (
       SELECT 1 FROM queue_messages x
         JOIN queue_deliveries dx ON dx.seq = x.seq AND dx.grp = :grp
        WHERE x.topic = :build_dlq AND x.partition_key = m.partition_key)
""")


@dataclass
class Samples:
    taken: int = 0
    skipped: int = 0  # the database was unreachable
    max_live: int = 0
    #: (time, kind, detail) of every violation, first ones kept
    violations: list[tuple[float, str, str]] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    forked_builds: set[str] = field(default_factory=set)
    dropped_builds: set[str] = field(default_factory=set)

    def violate(self, kind: str, detail: str, key: str = "") -> None:
        self.counts[kind] += 1
        if kind == "forked":
            self.forked_builds.add(key)
        elif kind in ("dropped", "uncarried_request"):
            self.dropped_builds.add(key)
        if len(self.violations) < 50:
            self.violations.append((time.time(), kind, detail))


class Sampler:
    """Checks the per-sample invariants on its own thread, through its own connection."""

    def __init__(self, url: str, interval_s: float = 0.25) -> None:
        self.engine = sa.create_engine(
            url, isolation_level="REPEATABLE READ", pool_size=1, pool_pre_ping=True
        )
        self.interval_s = interval_s
        self.samples = Samples()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> Samples:
        self._stop.set()
        self._thread.join(timeout=60)
        self.sample()  # one last look at the settled state
        self.engine.dispose()
        return self.samples

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        try:
            with self.engine.connect() as conn:
                unfinished = conn.execute(SAMPLE_UNFINISHED, NAMES).all()
                stray = conn.execute(SAMPLE_STRAY, NAMES).all()
                uncarried = conn.execute(SAMPLE_UNCARRIED_REQUESTS, NAMES).all()
                conn.rollback()
        except sa.exc.DBAPIError:
            self.samples.skipped += 1  # the outage, seen from the test's side
            return
        s = self.samples
        s.taken += 1
        for build_id, status, live, dead in unfinished:
            s.max_live = max(s.max_live, int(live))
            if live > 1 or live + dead > 1:
                s.violate(
                    "forked", f"{build_id} ({status}): {live} live polls, {dead} dead", build_id
                )
            elif live + dead == 0:
                s.violate("dropped", f"{build_id} ({status}) has no live poll", build_id)
        for build_id, message, status in stray:
            s.violate("stray", f"{message}: live poll of a {status or 'unknown'} build", build_id)
        for (request_id,) in uncarried:
            s.violate(
                "uncarried_request", f"{request_id}: no build and no live delivery", request_id
            )
