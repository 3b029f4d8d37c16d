"""Why each retry and each dead letter of a chaos run happened: the accounting of causes.

Retries are recorded by a trigger on ``queue_deliveries`` (test instrumentation in the run's
own database): every increment of ``retry_count`` writes a row with the previous owner, its
claim time and the error. After the run each retry is explained by an injected fault, or it is
a finding:

- ``status_fault``: a nack with the sim's status error, of the faulted queue, in its window;
- ``kill`` / ``pause``: a claim whose owner was SIGKILLed or SIGSTOPped while it held it;
- ``db_outage``: a claim (or a nack for a database error) that lived through the outage;
- ``disk_full``: the same for a claim of a daemon whose writes were refused (a full disk):
  its claim could not be kept alive nor settled, or its lease moved meanwhile;
- ``pause_locks``: a claim that waited on the row locks of a paused daemon and completed as
  it woke up;
- ``db_outage_backlog`` / ``disk_full_backlog``: a claim made in the backlog right after an
  outage or a full disk, that waited in a busy daemon's memory past its visibility timeout.

A clock step explains nothing: it must cause no retry. A dead letter is explained by the
retries that put it there; its cause is theirs (most of them), ``reject`` if it had none.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from tests.system.chaos.cluster import Lifetime
from tests.system.chaos.faults import FaultLog, Window
from tests.system.chaos.sampler import NAMES

STATUS_FAULT_ERROR = "simulated status failure"
#: A write refused for a full disk, as the daemon words it (MariaDB 1021, SQLite).
DISK_FULL_ERROR = re.compile(r"Disk full|\b1021\b|disk is full")
#: After the database comes back every daemon has a backlog (polls that fell due meanwhile,
#: requests submitted meanwhile); a claim that waits in a busy daemon's memory past its
#: visibility timeout is redelivered. Counted as the outage's doing for this long after it.
#: The same holds after a full disk.
BACKLOG_S = 15.0
#: How long after a SIGCONT claims that waited on the paused daemon's locks still complete.
PAUSE_AFTERMATH_S = 1.0
#: A failed step retries the database for up to 30 s before it gives up and nacks.
DB_RETRY_BUDGET_S = 35.0
#: The causes that are a full disk's doing.
DISK_FULL_CAUSES = ("disk_full", "disk_full_backlog")

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
class DeadLetter:
    name: str  # <topic>:<message id>
    topic: str
    partition_key: str
    original_topic: str
    failure_count: int
    last_error: str
    #: The causes of the retries that put it there.
    causes: list[str]

    @property
    def of_a_dead_letter(self) -> bool:
        """A dead letter of a dead-letter topic: nothing consumes those."""
        return self.original_topic.endswith("_dlq")

    @property
    def explained(self) -> bool:
        return bool(self.causes) and all(self.causes)

    @property
    def cause(self) -> str:
        return Counter(self.causes).most_common(1)[0][0] if self.causes else "reject"


def explain_retries(
    conn: Connection,
    builds: Mapping[str, Any],
    faulted_queue: str,
    faults: FaultLog,
    lives: list[Lifetime],
) -> list[Retry]:
    """Every retry of the run, each with its cause ("" if none explains it)."""
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
        on_faulted_queue = queue_of_build.get(retry.partition_key) == faulted_queue
        retry.cause = _cause(retry, on_faulted_queue, faults, _owner(retry, lives))
        retries.append(retry)
    return retries


def _owner(retry: Retry, lives: list[Lifetime]) -> Lifetime | None:
    """The daemon process that held the claim."""
    return next(
        (
            x
            for x in lives
            if x.pid == retry.owner_pid
            and x.started - 1 <= retry.claimed_s
            and (x.ended is None or retry.claimed_s <= x.ended + 1)
        ),
        None,
    )


def _cause(retry: Retry, on_faulted_queue: bool, faults: FaultLog, life: Lifetime | None) -> str:
    outages = faults.of("db_outage")
    # The full disks of the daemon that held the claim (another daemon's writes went on).
    full = [w for w in faults.of("disk_full") if life and life.node in w.nodes]
    claimed, at = retry.claimed_s, retry.at_s
    if retry.kind == "nack":
        if STATUS_FAULT_ERROR in retry.error:
            in_window = _any_overlap(faults.of("status_fault"), at, at, 2.0)
            return "status_fault" if on_faulted_queue and in_window else ""
        if "database" in retry.error and _any_overlap(outages, claimed, at, DB_RETRY_BUDGET_S):
            return "db_outage"
        if DISK_FULL_ERROR.search(retry.error) and _any_overlap(
            full, claimed, at, DB_RETRY_BUDGET_S
        ):
            return "disk_full"
        return ""
    # A visibility timeout: the owner did not finish in time. Why?
    if (
        life is not None
        and life.end == "killed"
        and life.ended is not None
        and claimed <= life.ended + 0.1 <= at + 0.2
    ):
        return "kill"
    if life is not None and any(
        p[0] <= at and (p[1] or float("inf")) >= claimed for p in life.pauses
    ):
        return "pause"
    if _any_overlap(outages, claimed, at, 2.0):
        return "db_outage"
    if _any_overlap(full, claimed, at, 2.0):
        return "disk_full"
    # A daemon paused inside a transaction keeps its row locks: the others' claims and lease
    # renewals wait for it, and a claim that completes as it wakes may be for a lease that is
    # about to move (the renewals that would have kept it were stuck behind the same locks).
    if any(w.start <= claimed <= w.end + PAUSE_AFTERMATH_S for w in faults.of("pause")):
        return "pause_locks"
    if any(w.start <= claimed <= w.end + BACKLOG_S for w in outages):
        return "db_outage_backlog"
    if any(w.start <= claimed <= w.end + BACKLOG_S for w in full):
        return "disk_full_backlog"
    return ""


def _any_overlap(windows: list[Window], start: float, end: float, slack: float) -> bool:
    return any(w.overlaps(start, end, slack) for w in windows)


def dead_letters(conn: Connection, retries: list[Retry]) -> list[DeadLetter]:
    """Every dead letter of the run, with the causes of the retries that put it there."""
    by_seq: dict[int, list[Retry]] = defaultdict(list)
    for retry in retries:
        by_seq[retry.seq].append(retry)
    rows = conn.exec_driver_sql(
        "SELECT d.topic, d.partition_key, d.message_id, d.original_topic, d.failure_count,"
        " d.last_error, o.seq AS original_seq FROM queue_messages d"
        " LEFT JOIN queue_messages o ON o.topic = d.original_topic"
        "  AND o.partition_key = d.partition_key AND o.message_id = d.message_id"
        "  AND o.dlq_group = ''"
        " WHERE d.original_topic IS NOT NULL"
    ).all()
    return [
        DeadLetter(
            name=f"{row.topic}:{row.message_id}",
            topic=row.topic,
            partition_key=row.partition_key,
            original_topic=row.original_topic,
            failure_count=int(row.failure_count),
            last_error=row.last_error or "",
            causes=[r.cause for r in by_seq.get(row.original_seq, [])],
        )
        for row in rows
    ]
