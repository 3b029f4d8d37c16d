"""What an operator (``buildq queue …``, ``buildq dlq …``) and the metrics collector do to the
queue, over ``admin_queries`` and ``stats_queries``: read-only views, and repairs that keep the
queue's invariants. Returns plain dataclasses and dicts (``*_ms`` keys are epoch ms from the
database clock, or durations). Large deletions run in batches of short transactions so a purge
never holds MySQL locks for long; each batch is idempotent, so an interrupted purge is finished
by running it again.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Connection

from buildq.queue.contract import DLQ_SUFFIX, QueueError, dlq_topic
from buildq.queue.sql import admin_queries as aq
from buildq.queue.sql import queries as q
from buildq.queue.sql import stats_queries as sq
from buildq.queue.sql.messages import MessageStore, decode_metadata, new_publish_token
from buildq.queue.sql.stats import GroupStats, TopicStats, fold_stats, int_or_none
from buildq.storage.database import Database

BATCH = 1000
_MAX_OFFSET = 2**62


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters of a topic a command acts on; None means "any"."""

    message_id: str | None = None
    partition_key: str | None = None
    group: str | None = None
    error_contains: str | None = None
    older_than_ms: int | None = None


@dataclass(frozen=True, slots=True)
class ResetResult:
    added: int  # deliveries created for messages at or after the offset
    skipped: int  # pending deliveries before the offset, dropped


@dataclass
class RequeueResult:
    requeued: list[dict[str, Any]] = field(default_factory=list)
    #: Already requeued or purged by someone else meanwhile.
    gone: list[dict[str, Any]] = field(default_factory=list)
    #: Could not be requeued; each has a ``reason``. Their dead letters stay.
    failed: list[dict[str, Any]] = field(default_factory=list)


class _NotRequeued(QueueError):
    """Rolls back one requeue; the dead letter stays where it is."""


class QueueAdmin:
    def __init__(self, db: Database, store: MessageStore) -> None:
        self.db = db
        self.store = store

    # --- views ---------------------------------------------------------------------------

    def topic_stats(
        self, topic: str | None = None, *, count_messages: bool = True
    ) -> list[TopicStats]:
        """Counts per topic and group in one aggregate query; ``topic`` narrows it to that
        topic and its DLQ topic. ``count_messages=False`` (for frequent refreshes) skips
        sizing the logs, which are never pruned: ``messages`` is then None except for DLQ
        topics."""
        if topic is not None:
            rows = self._all(sq.select_topic_stats, {"topics": [topic, dlq_topic(topic)]})
        else:
            stmt = sq.select_all_topic_stats if count_messages else sq.select_group_stats
            rows = self._all(stmt, {})
        return fold_stats(rows, counted=count_messages or topic is not None)

    def lag(self, topic: str) -> list[GroupStats]:
        for stats in self.topic_stats(topic):
            if stats.topic == topic:
                return list(stats.groups)
        return []

    def topic_summary(self, topic: str) -> dict[str, Any]:
        [row] = self._all(aq.select_topic_summary, {"topic": topic})
        return {key: int_or_none(value) for key, value in row.items()}

    def messages(
        self, topic: str, *, partition_key: str | None = None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The newest messages of a topic (or of one partition), newest first."""
        params: dict[str, Any] = {"topic": topic, "limit": limit}
        if partition_key is None:
            return self._all(aq.select_messages, params)
        return self._all(aq.select_partition_messages, params | {"partition_key": partition_key})

    def inspect(
        self,
        topic: str,
        message_id: str,
        *,
        partition_key: str | None = None,
        group: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every stored row of the message (one per partition, and per failed group in a DLQ
        topic), each with its pending deliveries and the groups that are done with it."""
        return self.db.read(lambda conn: _inspect_in(conn, topic, message_id, partition_key, group))

    def find_offsets(
        self, topic: str, message_id: str, partition_key: str | None = None
    ) -> list[int]:
        rows = self._all(aq.select_message_rows, {"topic": topic, "message_id": message_id})
        return [r["offset"] for r in rows if partition_key in (None, r["partition_key"])]

    def last_offset(self, topic: str) -> int | None:
        return int_or_none(self._scalar(aq.select_last_offset, {"topic": topic}))

    def leases(self, topic: str | None = None, group: str | None = None) -> list[dict[str, Any]]:
        rows = self._all(aq.select_all_leases, {})
        return [_lease(r) for r in rows if _matches(r, topic, group)]

    def stale(self, older_than_ms: int) -> dict[str, list[dict[str, Any]]]:
        """Leases their owner stopped renewing, and members silent for ``older_than_ms``."""
        leases = [_lease(r) for r in self._all(aq.select_stale_leases, {})]
        members = self._all(aq.select_stale_subscribers, {"older_than_ms": older_than_ms})
        return {"leases": leases, "subscribers": members}

    # --- repairs ---------------------------------------------------------------------------

    def release_leases(
        self,
        topic: str,
        group: str,
        *,
        slots: Sequence[int] | None = None,
        owner: str | None = None,
    ) -> int:
        """Free leases (all of the group's, or by slot or owner); returns how many changed.

        A member that still thinks it holds one is fenced: its writes check the owner."""
        params: dict[str, Any] = {"topic": topic, "grp": group}
        if slots is not None:
            stmt, params = aq.release_lease_slots, params | {"slots": list(slots)}
        elif owner is not None:
            stmt, params = aq.release_owner_leases, params | {"owner": owner}
        else:
            stmt = aq.release_group_leases
        return self._count_written(stmt, params)

    def reset_offset(self, topic: str, group: str, offset: int, *, dry_run: bool) -> ResetResult:
        """From now on the group receives every retained message with offset >= ``offset``
        and none before it."""
        params = {"topic": topic, "grp": group, "from_offset": offset, "before_offset": offset}
        params |= {"limit": BATCH}
        if self._scalar(aq.select_group_slots, params) is None:
            raise QueueError(f"consumer group {group!r} does not exist on topic {topic!r}")
        if dry_run:
            return ResetResult(
                added=int(self._scalar(aq.count_missing_deliveries, params)),
                skipped=int(self._scalar(aq.count_deliveries_before, params)),
            )
        added = sum(
            self._count_written(aq.insert_group_deliveries, {"grp": group, "seqs": seqs})
            for seqs in self._offset_batches(topic, offset)
        )
        skipped = 0
        while seqs := [int(s) for s in self._scalars(aq.select_deliveries_before, params)]:
            skipped += self._count_written(aq.delete_group_deliveries, {"grp": group, "seqs": seqs})
        return ResetResult(added=added, skipped=skipped)

    def delete_offsets(self, offsets: Sequence[int]) -> int:
        """Delete these messages and all their deliveries; returns messages deleted."""
        batches = [list(offsets[i : i + BATCH]) for i in range(0, len(offsets), BATCH)]
        return sum(self._delete(batch) for batch in batches)

    def purge_topic(self, topic: str) -> int:
        """Delete every message of the topic retained now, and their deliveries."""
        last = self.last_offset(topic)
        if last is None:
            return 0
        return sum(self._delete(seqs) for seqs in self._offset_batches(topic, 0, last))

    # --- dead letters ----------------------------------------------------------------------

    def dead_letters(
        self,
        topic: str,
        where: DeadLetterFilter = DeadLetterFilter(),
        *,
        limit: int | None = None,
    ) -> list[dict[str, Any]]:
        """Dead letters of ``topic`` (the original topic's name), oldest first."""
        found: list[dict[str, Any]] = []
        for batch in self._dead_letter_batches(topic, where):
            found.extend(batch)
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found

    def requeue(
        self,
        topic: str,
        where: DeadLetterFilter,
        *,
        rate_per_s: float | None = None,
    ) -> RequeueResult:
        """Send dead letters back to the group that failed them, with retry_count 0, one
        transaction each; ``rate_per_s`` paces them."""
        result = RequeueResult()
        pace = _Pacer(rate_per_s)
        for batch in self._dead_letter_batches(topic, where):
            for letter in batch:
                pace.wait()
                getattr(result, self._requeue_one(letter)).append(letter)
        return result

    def _requeue_one(self, letter: dict[str, Any]) -> str:
        try:
            return self.db.write(lambda conn: _requeue_in(conn, letter["offset"]))
        except _NotRequeued as err:
            letter["reason"] = str(err)
            return "failed"

    def purge_dead_letters(self, topic: str, where: DeadLetterFilter) -> int:
        deleted = 0
        for batch in self._dead_letter_batches(topic, where):
            deleted += self.delete_offsets([letter["offset"] for letter in batch])
        return deleted

    # --- helpers ---------------------------------------------------------------------------

    def _dead_letter_batches(
        self, topic: str, where: DeadLetterFilter
    ) -> Iterator[list[dict[str, Any]]]:
        target = dlq_topic(original_topic(topic))
        last = self._scalar(aq.select_last_offset, {"topic": target})
        stmt = aq.select_dead_letters(
            by_id=where.message_id is not None,
            by_partition=where.partition_key is not None,
            by_group=where.group is not None,
            by_error=where.error_contains is not None,
            by_age=where.older_than_ms is not None,
        )
        params = {
            "dlq_topic": target,
            # Letters that fail again while we work land after this: never loop on them.
            "to_offset": last if last is not None else -1,
            "message_id": where.message_id,
            "partition_key": where.partition_key,
            "grp": where.group,
            "error_contains": where.error_contains,
            "older_than_ms": where.older_than_ms,
            "limit": BATCH,
            "after_offset": -1,
        }
        while batch := self._all(stmt, {k: v for k, v in params.items() if v is not None}):
            yield batch
            params["after_offset"] = int(batch[-1]["offset"])

    def _offset_batches(
        self, topic: str, first: int, last: int = _MAX_OFFSET
    ) -> Iterator[list[int]]:
        params = {"topic": topic, "from_offset": first, "to_offset": last, "limit": BATCH}
        while seqs := [int(s) for s in self._scalars(aq.select_offsets, params)]:
            yield seqs
            params["from_offset"] = seqs[-1] + 1

    def _delete(self, seqs: list[int]) -> int:
        return self.db.write(lambda conn: _delete_in(conn, seqs))

    def _count_written(self, stmt: Any, params: dict[str, Any]) -> int:
        return int(self.db.write(lambda conn: conn.execute(stmt, q.params(params)).rowcount))

    def _all(self, stmt: Any, params: dict[str, Any]) -> list[dict[str, Any]]:
        return self.db.read(
            lambda conn: [dict(r) for r in conn.execute(stmt, q.params(params)).mappings()]
        )

    def _scalars(self, stmt: Any, params: dict[str, Any]) -> list[Any]:
        return self.db.read(lambda conn: list(conn.execute(stmt, q.params(params)).scalars()))

    def _scalar(self, stmt: Any, params: dict[str, Any]) -> Any:
        return self.db.read(lambda conn: conn.execute(stmt, q.params(params)).scalar())


def original_topic(topic: str) -> str:
    """The topic a name refers to: ``t`` for both ``t`` and its DLQ topic."""
    return topic.removesuffix(DLQ_SUFFIX)


def _requeue_in(conn: Connection, offset: int) -> str:
    row = conn.execute(aq.select_dead_letter, q.params({"seq": offset})).mappings().first()
    if row is None:
        return "gone"
    key = {
        "topic": row["original_topic"],
        "partition_key": row["partition_key"],
        "message_id": row["message_id"],
    }
    original = conn.execute(aq.select_original_seq, q.params(key)).scalar()
    if original is None:  # purged since it failed: put it back from the dead letter
        token = new_publish_token()
        conn.execute(aq.restore_original, q.params({"seq": offset, "publish_token": token}))
        original = conn.execute(aq.select_original_seq, q.params(key)).scalar_one()
    target = {"seq": original, "seqs": [original], "grp": row["failed_group"]}
    if conn.execute(aq.insert_group_deliveries, q.params(target)).rowcount == 0:
        conn.execute(aq.reset_delivery, q.params(target))
    if not conn.execute(aq.count_delivery, q.params(target)).scalar_one():
        raise _NotRequeued(
            f"consumer group {row['failed_group']!r} no longer exists on {row['original_topic']!r}"
        )
    if _delete_in(conn, [offset]) == 0:
        raise _NotRequeued("the dead letter vanished during the requeue")
    return "requeued"


def _delete_in(conn: Connection, seqs: list[int]) -> int:
    conn.execute(aq.delete_deliveries, q.params({"seqs": seqs}))
    return int(conn.execute(aq.delete_messages, q.params({"seqs": seqs})).rowcount)


def _inspect_in(
    conn: Connection, topic: str, message_id: str, partition_key: str | None, group: str | None
) -> list[dict[str, Any]]:
    rows = (
        conn.execute(aq.select_message_rows, q.params({"topic": topic, "message_id": message_id}))
        .mappings()
        .all()
    )
    groups = [r.grp for r in conn.execute(aq.select_topic_groups, q.params({"topic": topic}))]
    found = []
    for row in rows:
        if partition_key not in (None, row["partition_key"]) or group not in (
            None,
            row["dlq_group"],
        ):
            continue
        pending = conn.execute(aq.select_message_deliveries, q.params({"seq": row["offset"]}))
        deliveries = [_delivery(dict(d._mapping)) for d in pending]
        busy = {d["group"] for d in deliveries}
        found.append(
            _message(dict(row))
            | {"deliveries": deliveries, "done_groups": sorted(set(groups) - busy)}
        )
    return found


def _message(row: dict[str, Any]) -> dict[str, Any]:
    """The row as stored, the payload shown as JSON when it is JSON, else as base64."""
    payload = bytes(row.pop("payload"))
    try:
        row["payload"] = json.loads(payload.decode("utf-8"))
        row["payload_encoding"] = "json"
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested too deeply
        row["payload"] = base64.b64encode(payload).decode("ascii")
        row["payload_encoding"] = "base64"
    row["payload_bytes"] = len(payload)
    row["metadata"] = decode_metadata(row["metadata"])
    return row


def _delivery(row: dict[str, Any]) -> dict[str, Any]:
    row["group"] = row.pop("grp")
    row["in_flight"] = bool(row.pop("inflight"))
    return row


def _lease(row: dict[str, Any]) -> dict[str, Any]:
    now = int(row.pop("now_ms"))
    row["group"] = row.pop("grp")
    expires = int(row["expires_at_ms"])
    row["state"] = "free" if not row["owner"] else ("held" if expires > now else "expired")
    row["expires_in_ms"] = expires - now if row["owner"] else None
    return row


def _matches(row: dict[str, Any], topic: str | None, group: str | None) -> bool:
    return topic in (None, row["topic"]) and group in (None, row["grp"])


class _Pacer:
    """At most ``rate_per_s`` calls of ``wait()`` per second (None: no limit)."""

    def __init__(self, rate_per_s: float | None) -> None:
        self._interval = 1.0 / rate_per_s if rate_per_s else 0.0
        self._next = time.monotonic()

    def wait(self) -> None:
        if not self._interval:
            return
        now = time.monotonic()
        if now < self._next:
            time.sleep(self._next - now)
        self._next = max(now, self._next) + self._interval
