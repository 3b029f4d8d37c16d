"""The message store: the queue's log as rows, and the checks a message passes to get there.

A message enters the log in one of three ways, each in the transaction that also gives every
consumer group of its topic a delivery of it: ``insert_rows_in`` (a publish: ``SqlQueue``'s
and ``SqlTransaction``'s ``publish_many``, or ``insert_delayed`` on its own), the worker's
batched hand-off (``batch.py``: one multi-row INSERT of rows ``encode_message`` checked), and
``move_to_dlq_in``, which copies a message into ``<topic>_dlq`` for one group. Methods ending
in ``_in`` run inside a caller's transaction; the others open their own.
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from buildq.queue.contract import (
    DLQ_SUFFIX,
    DeadLetter,
    InvalidMessage,
    Message,
    PayloadTooLarge,
    PublishResult,
    dlq_topic,
)
from buildq.queue.settings import DEFAULT_MAX_METADATA_BYTES, DEFAULT_MAX_PAYLOAD_BYTES
from buildq.queue.sql import queries as q
from buildq.queue.sql.schema import GROUP_MAX, MESSAGE_ID_MAX, PARTITION_KEY_MAX, TOPIC_MAX
from buildq.storage.database import Database


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A row of the log as read back."""

    offset: int
    topic: str
    message: Message
    visible_after_ms: int
    created_at_ms: int
    dead_letter: DeadLetter | None


def partition_hash(partition_key: str) -> int:
    return zlib.crc32(partition_key.encode("utf-8"))


def new_publish_token() -> int:
    return random.getrandbits(62) + 1


class MessageStore:
    def __init__(
        self,
        db: Database,
        *,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        max_metadata_bytes: int = DEFAULT_MAX_METADATA_BYTES,
    ) -> None:
        self.db = db
        self.max_payload_bytes = max_payload_bytes
        self.max_metadata_bytes = max_metadata_bytes

    # --- own transaction -------------------------------------------------------------

    def insert_delayed(
        self, topic: str, messages: Sequence[Message], visible_after_ms: int
    ) -> list[PublishResult]:
        """Insert messages no subscriber sees before ``visible_after_ms`` (epoch ms, 0 = now)."""
        rows = self.encode(topic, messages)
        return self.db.write(
            lambda conn: self.insert_rows_in(conn, topic, rows, at_ms=visible_after_ms)
        )

    def fetch_by_offset(
        self, topic: str, partition_key: str, after_offset: int, now_ms: int, limit: int = 100
    ) -> list[StoredMessage]:
        """Messages of one partition after ``after_offset`` that are visible at ``now_ms``."""
        params = {
            "topic": topic,
            "partition_key": partition_key,
            "after_offset": after_offset,
            "now_ms": now_ms,
            "limit": limit,
        }
        rows = self.db.read(
            lambda conn: conn.execute(q.fetch_by_offset, q.params(params)).mappings().all()
        )
        return [stored_message(row) for row in rows]

    def now_ms(self) -> int:
        """The database server's clock."""
        return int(self.db.read(lambda conn: conn.execute(q.select_db_now).scalar_one()))

    def expedite(self, topic: str, partition_key: str) -> int:
        """Make the partition's waiting deliveries due now; returns how many there were."""
        params = {"topic": topic, "partition_key": partition_key}
        return self.db.write(
            lambda conn: conn.execute(q.expedite_partition, q.params(params)).rowcount
        )

    # --- inside a caller's transaction --------------------------------------------------

    def encode(self, topic: str, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """Validate and turn messages into row parameters; refuse before anything is written."""
        check_topic(topic)
        token = new_publish_token()
        return [self._encode_one(topic, message, token) for message in messages]

    def insert_rows_in(
        self,
        conn: Connection,
        topic: str,
        rows: list[dict[str, Any]],
        *,
        at_ms: int = 0,
        delay_ms: int = 0,
    ) -> list[PublishResult]:
        if not rows:
            return []
        firsts: dict[tuple[str, str], dict[str, Any]] = {}
        for row in rows:
            firsts.setdefault((row["partition_key"], row["message_id"]), row)
        unique = list(firsts.values())
        if len(unique) < len(rows):
            # The same identity twice in one batch: the first is published, the rest are dups.
            first = {id(r) for r in unique}
            results = self.insert_rows_in(conn, topic, unique, at_ms=at_ms, delay_ms=delay_ms)
            by_key = {(r.partition_key, r.message_id): r for r in results}
            return [
                by_key[(r["partition_key"], r["message_id"])]
                if id(r) in first
                else PublishResult(r["message_id"], r["partition_key"], duplicate=True)
                for r in rows
            ]
        if len(rows) > 1:
            now = int(conn.execute(q.select_db_now).scalar_one())
            visible = now + delay_ms if delay_ms > 0 else max(0, at_ms)
            stmt, extra = q.insert_message_rows, {"visible_after": visible, "created_at": now}
        elif delay_ms > 0:
            stmt, extra = q.insert_messages_after, {"delay_ms": delay_ms}
        else:
            stmt, extra = q.insert_messages_at, {"visible_after": max(0, at_ms)}
        if len(rows) == 1:  # the common case (every poll): fan out by the new row's offset
            result = conn.execute(stmt, q.params(rows[0] | extra))
            if result.rowcount != 1:
                return [_result(rows[0], set())]
            conn.execute(q.fan_out_message, q.params({"seq": result.lastrowid}))
            return [_result(rows[0], None)]
        inserted = conn.execute(stmt, q.many([row | extra for row in rows])).rowcount
        keys = {
            "topic": topic,
            "partition_keys": sorted({row["partition_key"] for row in rows}),
            "message_ids": sorted({row["message_id"] for row in rows}),
            "publish_token": rows[0]["publish_token"],
        }
        if inserted:
            conn.execute(q.fan_out_messages, q.params(keys | {"dlq_group": ""}))
        if inserted == len(rows):
            fresh = None
        elif inserted == 0:
            fresh = set()
        else:
            fresh = {tuple(r) for r in conn.execute(q.select_published_ids, q.params(keys)).all()}
        return [_result(row, fresh) for row in rows]

    def move_to_dlq_in(
        self,
        conn: Connection,
        *,
        topic: str,
        group: str,
        offset: int,
        failure_count: int,
        error: str,
    ) -> bool:
        """Copy the message into ``<topic>_dlq`` for ``group`` and drop the group's delivery.

        Idempotent: a second move finds the dead letter in place, writes nothing and still
        succeeds. Other groups keep their deliveries of the message.
        """
        token = new_publish_token()
        target = dlq_topic(topic)
        written = conn.execute(
            q.insert_dead_letter,
            q.params(
                {
                    "dlq_topic": target,
                    "grp": group,
                    "publish_token": token,
                    "failure_count": failure_count,
                    "error": error[:10_000],
                    "seq": offset,
                }
            ),
        ).rowcount
        if written:
            key = conn.execute(q.select_message_key, q.params({"seq": offset})).one()
            conn.execute(
                q.fan_out_messages,
                q.params(
                    {
                        "topic": target,
                        "partition_keys": [key.partition_key],
                        "message_ids": [key.message_id],
                        "dlq_group": group,
                        "publish_token": token,
                    }
                ),
            )
        conn.execute(q.delete_delivery, q.params({"seq": offset, "grp": group}))
        return bool(written)

    def _encode_one(self, topic: str, message: Message, token: int) -> dict[str, Any]:
        partition_key, message_id, hashed, payload, metadata = self.encode_message(message)
        return {
            "topic": topic,
            "partition_key": partition_key,
            "message_id": message_id,
            "partition_hash": hashed,
            "payload": payload,
            "metadata": metadata,
            "publish_token": token,
        }

    def encode_message(self, message: Message) -> tuple[str, str, int, bytes, str]:
        """Validate ``message`` and give its row values: partition key, id, partition hash,
        payload, metadata JSON. Refuses (InvalidMessage) before anything is written."""
        if not isinstance(message, Message):
            raise InvalidMessage(f"expected a Message, got {type(message).__name__}")
        _check_len("message id", message.id, MESSAGE_ID_MAX, allow_empty=False)
        _check_len("partition key", message.partition_key, PARTITION_KEY_MAX)
        if not isinstance(message.payload, bytes | bytearray | memoryview):
            raise InvalidMessage("payload must be bytes")
        if len(message.payload) > self.max_payload_bytes:
            raise PayloadTooLarge(
                f"payload of message {message.id!r} is {len(message.payload)} bytes; "
                f"the limit is {self.max_payload_bytes} (queue.max_payload_bytes)"
            )
        metadata = (
            "{}"  # the common case, without a JSON round
            if isinstance(message.metadata, dict) and not message.metadata
            else _encode_metadata(message.metadata, self.max_metadata_bytes)
        )
        return (
            message.partition_key,
            message.id,
            partition_hash(message.partition_key),
            bytes(message.payload),
            metadata,
        )


def _result(row: dict[str, Any], fresh: set[tuple[Any, ...]] | None) -> PublishResult:
    key = (row["partition_key"], row["message_id"])
    return PublishResult(
        message_id=row["message_id"],
        partition_key=row["partition_key"],
        duplicate=fresh is not None and key not in fresh,
    )


def _check_len(what: str, value: object, limit: int, *, allow_empty: bool = True) -> None:
    if not isinstance(value, str):
        raise InvalidMessage(f"{what} must be a string, got {type(value).__name__}")
    if not allow_empty and not value:
        raise InvalidMessage(f"{what} must not be empty")
    if len(value) > limit:
        raise InvalidMessage(f"{what} is {len(value)} characters; the limit is {limit}")
    _check_utf8(what, value)


def _check_utf8(what: str, value: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"{what} is not valid Unicode (lone surrogate)") from None


def _encode_metadata(metadata: object, limit: int) -> str:
    if not isinstance(metadata, dict) and not hasattr(metadata, "items"):
        raise InvalidMessage("metadata must be a mapping of strings to strings")
    items = dict(metadata.items())
    for key, value in items.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InvalidMessage("metadata must map strings to strings")
        _check_utf8("metadata", key)
        _check_utf8("metadata", value)
    text = json.dumps(items, ensure_ascii=False, sort_keys=True)
    if len(text.encode("utf-8")) > limit:
        raise InvalidMessage(f"metadata is larger than {limit} bytes")
    return text


#: Set instead of the metadata when a stored row's metadata cannot be read back.
METADATA_ERROR_KEY = "buildq_metadata_error"


def decode_metadata(raw: object) -> dict[str, str]:
    """A row's metadata column as a mapping of strings, whatever the row holds.

    Every row buildq writes holds a JSON object of strings. A row written around buildq (not
    UTF-8, not JSON) decodes to a note under ``METADATA_ERROR_KEY`` instead of raising: one
    bad row must not stop its subscription from fetching (and burn the retries of every
    healthy message claimed in the same batch).
    """
    if raw == "{}":  # what nearly every message carries
        return {}
    if isinstance(raw, bytes | bytearray | memoryview):
        raw = bytes(raw).decode("utf-8", "replace")
    try:
        value = json.loads(raw or "{}")  # type: ignore[arg-type]
    except (ValueError, TypeError, RecursionError):
        return {METADATA_ERROR_KEY: "the stored metadata is not JSON"}
    if not isinstance(value, dict):
        return {METADATA_ERROR_KEY: "the stored metadata is not a JSON object"}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def check_topic(topic: str) -> None:
    # Room for the DLQ suffix: a dead letter's topic must fit the same column.
    _check_len("topic", topic, TOPIC_MAX - len(DLQ_SUFFIX), allow_empty=False)


def check_group_name(group: str) -> None:
    _check_len("consumer group", group, GROUP_MAX, allow_empty=False)


def dead_letter_of(row: Any) -> DeadLetter | None:
    """The DLQ fields of a message row, or None for a message in its own topic."""
    if row["original_topic"] is None:
        return None
    return DeadLetter(
        original_topic=row["original_topic"],
        failed_group=row["dlq_group"],
        failed_at_ms=int(row["failed_at"] or 0),
        failure_count=int(row["failure_count"] or 0),
        last_error=row["last_error"] or "",
    )


def stored_message(row: Any) -> StoredMessage:
    dead = dead_letter_of(row)
    return StoredMessage(
        offset=int(row["seq"]),
        topic=row["topic"],
        message=Message(
            id=row["message_id"],
            payload=bytes(row["payload"]),
            partition_key=row["partition_key"],
            metadata=decode_metadata(row["metadata"]),
        ),
        visible_after_ms=int(row["visible_after"]),
        created_at_ms=int(row["created_at"]),
        dead_letter=dead,
    )
