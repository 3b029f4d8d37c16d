"""Retention: the log keeps a message until every group is done with it and it is old enough.

A message's row is also its deduplication record (publish is idempotent on its identity), so
it is kept for ``retention_ms`` after it was written even when every group has acked it; after
that, a message no group still has to process is deleted, in small batches so that on MySQL no
transaction holds many locks. Dead letters are messages too and age out the same way once
their DLQ consumers are done with them.
"""

from __future__ import annotations

from dataclasses import dataclass

from buildq.queue.settings import DEFAULT_RETENTION_MS
from buildq.queue.sql import queries as q
from buildq.storage.database import Database

BATCH = 500


@dataclass
class PurgeResult:
    deleted: int
    scanned: int


class Retention:
    """Deletes expired messages; keeps a cursor so each call continues where the last stopped."""

    def __init__(self, db: Database, retention_ms: int = DEFAULT_RETENTION_MS) -> None:
        self.db = db
        self.retention_ms = retention_ms
        self._after = 0

    def purge(self, max_batches: int = 20) -> PurgeResult:
        """Delete up to ``max_batches`` batches of expired messages; returns what it did."""
        deleted = scanned = 0
        cutoff = self._cutoff()  # once: a purge is short, and an earlier cutoff keeps more
        for _ in range(max_batches):
            rows = self.db.read(
                lambda conn: conn.execute(
                    q.select_expired, q.params({"after": self._after, "limit": BATCH})
                ).all()
            )
            old = [r.seq for r in rows if r.created_at < cutoff]
            scanned += len(rows)
            if old:
                deleted += self._delete(old, cutoff)
            if len(rows) < BATCH or len(old) < len(rows):
                # The end of the log, or the first message young enough to keep: start over
                # from the oldest next time (messages still being processed stay behind).
                self._after = 0
                break
            self._after = old[-1]
        return PurgeResult(deleted, scanned)

    def _delete(self, seqs: list[int], cutoff: int) -> int:
        params = q.params({"seqs": seqs, "cutoff": cutoff})
        return int(self.db.write(lambda conn: conn.execute(q.delete_expired, params).rowcount))

    def _cutoff(self) -> int:
        return (
            int(self.db.read(lambda conn: conn.execute(q.select_db_now).scalar_one()))
            - self.retention_ms
        )
