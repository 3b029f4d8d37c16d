"""The invariants of a chaos run, checked from the database during and after the run.

During the run a ``Sampler`` reads, in one REPEATABLE READ snapshot every few hundred ms:

- every unfinished build has at most one live ``buildsignal`` delivery, and at least one live
  ``buildsignal`` or ``buildsignal_dlq`` delivery (a dead letter waiting for its reconciler
  still carries the build: nothing is silently dropped from the loop);
- no finished build has a live poll (a stray chain);
- every submitted request is either stored as a build or still carried by a live ``build``
  or ``build_dlq`` delivery.

Retries are recorded by a trigger on ``queue_deliveries`` (test instrumentation in the run's
own database): every increment of ``retry_count`` writes a row with the previous owner, its
claim time and the error. After the run each retry is explained by an injected fault — a
``status`` failure of the faulted queue (nack), its owner SIGKILLed or SIGSTOPped while it
held the delivery (visibility timeout), or a database outage during the claim — or it is a
finding. Dead letters are explained by the retries that put them there.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from buildq.orchestrator import topics
from tests.chaos.cluster import Lifetime, read_events
from tests.chaos.faults import FaultLog, Window

TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
GROUP = topics.GROUP
STATUS_FAULT_ERROR = "simulated status failure"
#: Tracebacks already reported, whose fix is in a file this change may not edit. Each stays
#: visible in the summary (``known_findings``); remove the entry once the fix lands. (Both
#: earlier entries, healthz before subscriptions and the ops prober gone, are fixed.)
KNOWN_TRACEBACKS: dict[str, str] = {}
#: After the database comes back every daemon has a backlog (polls that fell due meanwhile,
#: requests submitted meanwhile); a claim that waits in a busy daemon's memory past its
#: visibility timeout is redelivered. Counted as the outage's doing for this long after it.
BACKLOG_S = 15.0
#: How long after a SIGCONT claims that waited on the paused daemon's locks still complete.
PAUSE_AFTERMATH_S = 1.0
#: A failed step retries the database for up to 30 s before it gives up and nacks.
DB_RETRY_BUDGET_S = 35.0

AUDIT_DDL = (
    """
    CREATE TABLE chaos_retries (
        id BIGINT AUTO_INCREMENT PRIMARY KEY,
        seq BIGINT NOT NULL,
        grp VARCHAR(64) NOT NULL,
        topic VARCHAR(100) NOT NULL,
        old_owner VARCHAR(128) NOT NULL,
        old_inflight SMALLINT NOT NULL,
        old_attempt INT NOT NULL,
        old_delivered_at BIGINT NOT NULL,
        new_inflight SMALLINT NOT NULL,
        new_retry_count INT NOT NULL,
        last_error TEXT NULL,
        at_ms BIGINT NOT NULL
    )
    """,
    """
    CREATE TRIGGER chaos_retry_audit AFTER UPDATE ON queue_deliveries FOR EACH ROW
    BEGIN
        IF NEW.retry_count > OLD.retry_count THEN
            INSERT INTO chaos_retries (seq, grp, topic, old_owner, old_inflight, old_attempt,
                old_delivered_at, new_inflight, new_retry_count, last_error, at_ms)
            VALUES (OLD.seq, OLD.grp, OLD.topic, OLD.owner, OLD.inflight, OLD.attempt,
                OLD.delivered_at, NEW.inflight, NEW.retry_count, NEW.last_error,
                CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED));
        END IF;
    END
    """,
)


def install(engine: Engine) -> None:
    """Record every retry of every delivery (test instrumentation, this database only)."""
    with engine.begin() as conn:
        for statement in AUDIT_DDL:
            conn.exec_driver_sql(statement)


# --- sampling during the run ---------------------------------------------------------------

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


# --- after the run -----------------------------------------------------------------------


@dataclass
class Retry:
    seq: int
    topic: str
    partition_key: str
    message_id: str
    kind: str  # "nack" or "timeout"
    owner: str
    claimed_s: float
    at_s: float
    error: str
    cause: str = ""  # what explains it; "" = nothing

    @property
    def owner_pid(self) -> int | None:
        parts = self.owner.rsplit(":", 2)
        return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


@dataclass
class Verdict:
    submitted: int
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    retriggered_same_build: int = 0
    forked: list[str] = field(default_factory=list)
    chain_broken: list[str] = field(default_factory=list)
    result_mismatch: list[str] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    retries: Counter[str] = field(default_factory=Counter)
    unexplained_retries: list[Retry] = field(default_factory=list)
    dead_letters: Counter[str] = field(default_factory=Counter)
    unexplained_dead_letters: list[str] = field(default_factory=list)
    unreconciled: list[str] = field(default_factory=list)
    second_order_dead_letters: int = 0
    log_findings: Counter[str] = field(default_factory=Counter)
    samples: Samples = field(default_factory=Samples)
    crashes: list[str] = field(default_factory=list)
    readiness: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)

    def problems(self) -> list[str]:
        s = self.samples
        out = [
            *(f"lost: {r}" for r in self.lost[:20]),
            *(f"triggered twice (two runner builds): {r}" for r in self.duplicated[:20]),
            *(f"forked: {b}" for b in self.forked[:20]),
            *(f"poll chain broken: {b}" for b in self.chain_broken[:20]),
            *(f"result differs from the stored build: {r}" for r in self.result_mismatch[:20]),
            *(f"unexplained retry: {r}" for r in self.unexplained_retries[:20]),
            *(f"unexplained dead letter: {d}" for d in self.unexplained_dead_letters[:20]),
            *(f"dead letter not reconciled: {d}" for d in self.unreconciled[:20]),
            *(f"crash: {c}" for c in self.crashes),
            *(f"readiness: {r}" for r in self.readiness),
            *(f"harness: {e}" for e in self.harness_errors),
            *(f"sample: {kind} {detail}" for _, kind, detail in s.violations[:20]),
        ]
        if self.second_order_dead_letters:
            out.append(f"{self.second_order_dead_letters} dead letters of a dead-letter topic")
        for finding in ("handler_failed", "traceback"):
            if self.log_findings[finding]:
                out.append(f"{self.log_findings[finding]} '{finding}' in the daemon logs")
        return out

    def summary(self, **extra: object) -> str:
        s = self.samples
        fields_ = {
            "builds": self.submitted,
            "lost": len(self.lost),
            "duplicated": len(self.duplicated),
            "forked": len(set(self.forked) | s.forked_builds),
            "dropped": len(s.dropped_builds),
            "succeeded": self.statuses["SUCCEEDED"],
            "failed": self.statuses["FAILED"],
            "cancelled": self.statuses["CANCELLED"],
            "infra": self.statuses["FAILED(infra)"],
            "retries": sum(self.retries.values()),
            "unexplained_retries": len(self.unexplained_retries),
            "dlq": sum(self.dead_letters.values()),
            "unexplained_dlq": len(self.unexplained_dead_letters),
            "samples": s.taken,
            "max_live_polls": s.max_live,
            **extra,
        }
        return "CHAOS " + " ".join(f"{k}={v}" for k, v in fields_.items())


def judge(
    url: str,
    submitted: list[str],
    faulted_queue: str,
    faults: FaultLog,
    lifetimes: Iterable[Lifetime],
    samples: Samples,
) -> Verdict:
    engine = sa.create_engine(url, pool_size=1)
    try:
        with engine.connect() as conn:
            verdict = Verdict(len(submitted), samples=samples)
            builds = {r.request_id: r for r in conn.exec_driver_sql("SELECT * FROM builds")}
            lives = list(lifetimes)
            _check_builds(conn, verdict, submitted, builds)
            _check_triggers(verdict, lives, builds)
            retries = _explain_retries(conn, builds, faulted_queue, faults, lives)
            verdict.retries = Counter(r.cause or "unexplained" for r in retries)
            verdict.unexplained_retries = [r for r in retries if not r.cause]
            _check_dead_letters(conn, verdict, retries, builds)
            _check_logs(verdict, lives)
    finally:
        engine.dispose()
    return verdict


def _check_builds(
    conn: Connection, verdict: Verdict, submitted: list[str], builds: Mapping[str, Any]
) -> None:
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in conn.execute(
        sa.text("SELECT partition_key, payload FROM queue_messages WHERE topic = :result"), NAMES
    ):
        results[row.partition_key].append(json.loads(bytes(row.payload)))
    polls: dict[str, list[int]] = defaultdict(list)
    for row in conn.execute(
        sa.text("SELECT partition_key, message_id FROM queue_messages WHERE topic = :signal"),
        NAMES,
    ):
        polls[row.partition_key].append(int(row.message_id.rsplit("/", 1)[1]))
    for request_id in submitted:
        build = builds.get(request_id)
        if build is None or build.status not in TERMINAL:
            verdict.lost.append(f"{request_id}: {build.status if build else 'no build'}")
            continue
        verdict.statuses[build.status] += 1
        if build.failure_reason == "infra":
            verdict.statuses["FAILED(infra)"] += 1
        got = results.get(request_id, [])
        if len(got) != 1:
            (verdict.lost if not got else verdict.duplicated).append(
                f"{request_id}: {len(got)} build results"
            )
        elif (got[0]["status"], got[0]["build_id"]) != (build.status, build.build_id):
            verdict.result_mismatch.append(f"{request_id}: result {got[0]} vs {build.status}")
        if build.build_id is not None:
            numbers = sorted(polls.get(build.build_id, []))
            if numbers != list(range(1, len(numbers) + 1)) or numbers[-1:] != [build.polls]:
                verdict.chain_broken.append(f"{build.build_id}: polls {numbers}, {build.polls}")
    unexpected = set(builds) - set(submitted)
    verdict.lost += [f"{r}: a build nobody submitted" for r in sorted(unexpected)]


def _check_triggers(verdict: Verdict, lives: list[Lifetime], builds: Mapping[str, Any]) -> None:
    """A second trigger of one request is visible only in the logs: the sim keeps no state."""
    triggered: dict[str, list[str]] = defaultdict(list)
    for life in lives:
        for event in read_events(life.log):
            if event.get("event") == "build_triggered":
                triggered[event["request_id"]].append(event["build_id"])
    for request_id, ids in triggered.items():
        if len(set(ids)) > 1:
            stored = builds[request_id].build_id if request_id in builds else None
            verdict.duplicated.append(
                f"{request_id}: runner builds {sorted(set(ids))}, kept {stored}"
            )
        verdict.retriggered_same_build += len(ids) - len(set(ids))


def _explain_retries(
    conn: Connection,
    builds: Mapping[str, Any],
    faulted_queue: str,
    faults: FaultLog,
    lives: list[Lifetime],
) -> list[Retry]:
    queue_of_build = {b.build_id: b.queue for b in builds.values() if b.build_id}
    rows = conn.execute(
        sa.text(
            "SELECT r.*, m.partition_key, m.message_id FROM chaos_retries r"
            " JOIN queue_messages m ON m.seq = r.seq WHERE r.grp = :grp ORDER BY r.id"
        ),
        NAMES,
    ).all()
    retries = []
    for row in rows:
        retry = Retry(
            seq=int(row.seq),
            topic=row.topic,
            partition_key=row.partition_key,
            message_id=row.message_id,
            kind="nack" if row.new_inflight == 0 else "timeout",
            owner=row.old_owner,
            claimed_s=int(row.old_delivered_at) / 1000,
            at_s=int(row.at_ms) / 1000,
            error=row.last_error or "",
        )
        retry.cause = _cause(retry, queue_of_build, faulted_queue, faults, lives)
        retries.append(retry)
    return retries


def _cause(
    retry: Retry,
    queue_of_build: Mapping[str, str],
    faulted_queue: str,
    faults: FaultLog,
    lives: list[Lifetime],
) -> str:
    outages = faults.of("db_outage")
    if retry.kind == "nack":
        if STATUS_FAULT_ERROR in retry.error:
            on_queue = queue_of_build.get(retry.partition_key) == faulted_queue
            in_window = _any_overlap(faults.of("status_fault"), retry.at_s, retry.at_s, 2.0)
            return "status_fault" if on_queue and in_window else ""
        if "database" in retry.error and _any_overlap(
            outages, retry.claimed_s, retry.at_s, DB_RETRY_BUDGET_S
        ):
            return "db_outage"
        return ""
    # A visibility timeout: the owner did not finish in time. Why?
    pid = retry.owner_pid
    life = next(
        (
            x
            for x in lives
            if x.pid == pid
            and x.started - 1 <= retry.claimed_s
            and (x.ended is None or retry.claimed_s <= x.ended + 1)
        ),
        None,
    )
    if (
        life is not None
        and life.end == "killed"
        and life.ended is not None
        and retry.claimed_s <= life.ended + 0.1 <= retry.at_s + 0.2
    ):
        return "kill"
    if life is not None and any(
        p[0] <= retry.at_s and (p[1] or float("inf")) >= retry.claimed_s for p in life.pauses
    ):
        return "pause"
    if _any_overlap(outages, retry.claimed_s, retry.at_s, 2.0):
        return "db_outage"
    # A daemon paused inside a transaction keeps its row locks: the others' claims and lease
    # renewals wait for it, and a claim that completes as it wakes may be for a lease that is
    # about to move (the renewals that would have kept it were stuck behind the same locks).
    if any(w.start <= retry.claimed_s <= w.end + PAUSE_AFTERMATH_S for w in faults.of("pause")):
        return "pause_locks"
    if any(w.start <= retry.claimed_s <= w.end + BACKLOG_S for w in outages):
        return "db_outage_backlog"
    return ""


def _any_overlap(windows: list[Window], start: float, end: float, slack: float) -> bool:
    return any(w.overlaps(start, end, slack) for w in windows)


def _check_dead_letters(
    conn: Connection, verdict: Verdict, retries: list[Retry], builds: Mapping[str, Any]
) -> None:
    by_seq: dict[int, list[Retry]] = defaultdict(list)
    for retry in retries:
        by_seq[retry.seq].append(retry)
    by_build = {b.build_id: b for b in builds.values() if b.build_id}
    rows = conn.exec_driver_sql(
        "SELECT d.topic, d.partition_key, d.message_id, d.original_topic, d.failure_count,"
        " d.last_error, o.seq AS original_seq FROM queue_messages d"
        " LEFT JOIN queue_messages o ON o.topic = d.original_topic"
        "  AND o.partition_key = d.partition_key AND o.message_id = d.message_id"
        "  AND o.dlq_group = ''"
        " WHERE d.original_topic IS NOT NULL"
    ).all()
    for row in rows:
        name = f"{row.topic}:{row.message_id}"
        if row.original_topic.endswith("_dlq"):
            verdict.second_order_dead_letters += 1
            verdict.unexplained_dead_letters.append(f"{name}: {row.last_error}")
            continue
        causes = [r.cause for r in by_seq.get(row.original_seq, [])]
        if not causes or not all(causes):
            verdict.unexplained_dead_letters.append(
                f"{name}: failure_count {row.failure_count}, retries {causes}: {row.last_error}"
            )
        verdict.dead_letters[Counter(causes).most_common(1)[0][0] if causes else "reject"] += 1
        build = (
            by_build.get(row.partition_key)
            if row.topic == topics.BUILDSIGNAL_DLQ
            else builds.get(row.partition_key)
        )
        if build is None or (build.status, build.failure_reason) != ("FAILED", "infra"):
            verdict.unreconciled.append(
                f"{name}: build is {build.status if build else 'missing'}"
                f" ({build.failure_reason if build else ''})"
            )
    pending = conn.execute(
        sa.text(
            "SELECT d.topic, COUNT(*) AS n FROM queue_deliveries d"
            " WHERE d.grp = :grp AND d.topic IN (:build_dlq, :signal_dlq) GROUP BY d.topic"
        ),
        NAMES,
    ).all()
    verdict.unreconciled += [f"{r.topic}: {r.n} dead letters never reconciled" for r in pending]


def _check_logs(verdict: Verdict, lives: list[Lifetime]) -> None:
    for life in lives:
        for event in read_events(life.log):
            name = str(event.get("event", ""))
            trace = str(event.get("exception", ""))
            if any(known in trace for known in KNOWN_TRACEBACKS.values()):
                verdict.log_findings["known"] += 1
            elif trace:
                verdict.log_findings["traceback"] += 1
            if name in ("handler_failed", "settle_failed", "delivery_lost", "fetch_failed"):
                verdict.log_findings[name] += 1
            if name in ("delivery_nacked", "delivery_rejected"):
                verdict.log_findings[name] += 1
        text = life.log.read_text(errors="replace") if life.log.exists() else ""
        # Tracebacks outside the JSON lines: an uncaught exception printed by the interpreter.
        for block in text.split("Traceback (most recent call last)")[1:]:
            known = any(k in block[:3000] for k in KNOWN_TRACEBACKS.values())
            verdict.log_findings["known" if known else "traceback"] += 1
