"""Publishing: idempotence, delays, batches, limits, ordering. Each test runs on both backends."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from buildq.queue import InvalidMessage, Message, PayloadTooLarge, PublisherClosed
from buildq.queue.sql import SqlQueue
from buildq.queue.sql.schema import deliveries, messages
from buildq.storage.database import Database
from tests.support.waiting import wait_until


def msg(mid: str, key: str = "p", payload: bytes = b"x", **meta: str) -> Message:
    return Message(id=mid, payload=payload, partition_key=key, metadata=meta)


def count(db: Database, table: sa.Table, *where: sa.ColumnElement[bool]) -> int:
    stmt = sa.select(sa.func.count()).select_from(table).where(*where)
    return int(db.read(lambda conn: conn.execute(stmt).scalar_one()))


def test_publish_then_fetch_round_trips_everything(queue, subscribe):
    sub = subscribe("t")
    result = queue.publish("t", msg("m1", "key-1", b"\x00\xffbytes", trace="abc", who="ü"))
    assert not result.duplicate
    [delivery] = sub.fetch(10)
    assert delivery.message == msg("m1", "key-1", b"\x00\xffbytes", trace="abc", who="ü")
    assert (delivery.topic, delivery.group) == ("t", "g")
    assert (delivery.attempt, delivery.retry_count) == (1, 0)
    assert delivery.dead_letter is None


def test_duplicate_publish_is_reported_and_writes_nothing(queue, db, subscribe):
    sub = subscribe("t")
    assert not queue.publish("t", msg("m1")).duplicate
    with capture_logs() as logs:
        again = queue.publish("t", msg("m1", payload=b"different"))
    assert again.duplicate
    assert any(e["event"] == "publish_duplicate" and e["message_id"] == "m1" for e in logs)
    assert count(db, messages) == 1
    [delivery] = sub.fetch(10)
    assert delivery.message.payload == b"x"
    # Same id in another partition or topic is a different message.
    assert not queue.publish("t", msg("m1", key="other")).duplicate
    assert not queue.publish("t2", msg("m1")).duplicate


def test_ids_differing_only_in_case_are_different_messages(queue):
    assert not queue.publish("t", msg("Build-1")).duplicate
    assert not queue.publish("t", msg("build-1")).duplicate


def test_batch_publish_reports_each_duplicate(queue, db):
    queue.publish("t", msg("b"))
    results = queue.publish_many("t", [msg("a"), msg("b"), msg("c"), msg("a")])
    assert [(r.message_id, r.duplicate) for r in results] == [
        ("a", False),
        ("b", True),
        ("c", False),
        ("a", True),
    ]
    assert count(db, messages) == 3


def test_batch_publish_is_one_transaction(queue, db):
    with pytest.raises(InvalidMessage):
        queue.publish_many("t", [msg("ok"), msg("")])
    assert count(db, messages) == 0


def test_publish_after_is_invisible_until_due(queue, db, subscribe):
    sub = subscribe("t")
    before = queue.store.now_ms()
    queue.publish_after("t", msg("later"), 400)
    row = db.read(lambda c: c.execute(sa.select(messages.c.visible_after)).one())
    assert before + 400 <= row.visible_after <= queue.store.now_ms() + 400
    assert sub.fetch(10) == []
    due = sub.next_due_ms()
    assert due is not None and 0 < due <= 400
    [delivery] = wait_until(lambda: sub.fetch(10), timeout=5)
    assert queue.store.now_ms() >= row.visible_after
    assert (delivery.message.id, delivery.retry_count, delivery.attempt) == ("later", 0, 1)


@pytest.mark.parametrize("delay", [0, -5_000])
def test_publish_after_without_positive_delay_is_publish(queue, db, subscribe, delay):
    sub = subscribe("t")
    queue.publish_after("t", msg("now"), delay)
    row = db.read(lambda c: c.execute(sa.select(messages.c.visible_after)).one())
    assert row.visible_after == 0
    [delivery] = sub.fetch(10)
    assert delivery.retry_count == 0


def test_closed_publisher_refuses_everything(queue):
    queue.close()
    with pytest.raises(PublisherClosed):
        queue.publish("t", msg("a"))
    with pytest.raises(PublisherClosed):
        queue.publish_after("t", msg("a"), 100)
    with pytest.raises(PublisherClosed):
        queue.publish_many("t", [msg("a")])
    with pytest.raises(PublisherClosed), queue.transaction():
        pass


def test_fetch_by_offset_skips_rows_not_yet_visible(queue):
    queue.publish("t", msg("a"))
    queue.store.insert_delayed("t", [msg("b")], visible_after_ms=5_000)
    queue.publish("t", msg("c"))
    queue.publish("t", msg("other-partition", key="q"))
    ids = lambda now: [s.message.id for s in queue.store.fetch_by_offset("t", "p", 0, now)]  # noqa: E731
    assert ids(4_999) == ["a", "c"]
    assert ids(5_000) == ["a", "b", "c"]
    first = queue.store.fetch_by_offset("t", "p", 0, 10_000)[0]
    assert [s.message.id for s in queue.store.fetch_by_offset("t", "p", first.offset, 10_000)] == [
        "b",
        "c",
    ]


def test_first_deliveries_keep_offset_order_within_a_partition(queue, subscribe):
    sub = subscribe("t")
    for i in range(30):
        queue.publish("t", msg(f"m{i}", key=f"k{i % 3}"))
    seen: dict[str, list[int]] = {}
    while batch := sub.fetch(7):
        for d in batch:
            seen.setdefault(d.message.partition_key, []).append(int(d.message.id[1:]))
            d.ack()
    assert sorted(n for ns in seen.values() for n in ns) == list(range(30))
    for numbers in seen.values():
        assert numbers == sorted(numbers)


def test_a_delayed_message_does_not_block_its_partition(queue, subscribe):
    sub = subscribe("t")
    queue.publish_after("t", msg("slow"), 60_000)
    queue.publish("t", msg("fast"))
    assert [d.message.id for d in sub.fetch(10)] == ["fast"]


def test_oversize_payload_is_refused_before_writing(db, subscribe):
    small = SqlQueue(db, max_payload_bytes=1024)
    with pytest.raises(PayloadTooLarge, match="1025 bytes; the limit is 1024"):
        small.publish("t", msg("big", payload=b"x" * 1025))
    assert count(db, messages) == 0
    assert not small.publish("t", msg("fits", payload=b"x" * 1024)).duplicate


def test_default_limit_payload_round_trips(queue, subscribe):
    sub = subscribe("t")
    payload = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # exactly 4 MiB, every byte value
    queue.publish("t", msg("huge", payload=payload))
    with pytest.raises(PayloadTooLarge):
        queue.publish("t", msg("huger", payload=payload + b"!"))
    [delivery] = sub.fetch(1)
    assert delivery.message.payload == payload


@pytest.mark.parametrize(
    "bad",
    [
        Message(id="", payload=b"", partition_key="p"),
        Message(id="x" * 256, payload=b"", partition_key="p"),
        Message(id="ok", payload=b"", partition_key="k" * 192),
        Message(id="\udcff", payload=b"", partition_key="p"),
        Message(id="ok", payload="text", partition_key="p"),  # type: ignore[arg-type]
        Message(id="ok", payload=b"", partition_key="p", metadata={"k": 1}),  # type: ignore[dict-item]
    ],
)
def test_invalid_messages_are_refused_with_a_reason(queue, db, bad):
    with pytest.raises(InvalidMessage):
        queue.publish("t", bad)
    assert count(db, messages) == 0


def test_hostile_strings_are_stored_verbatim(queue, subscribe):
    sub = subscribe("t")
    nasty = "'; DROP TABLE queue_messages; -- \" \\ \x00 ☃ 𝄞"
    queue.publish(
        "t", Message(id=nasty, payload=nasty.encode(), partition_key=nasty, metadata={nasty: nasty})
    )
    [delivery] = sub.fetch(1)
    assert delivery.message.id == nasty
    assert delivery.message.partition_key == nasty
    assert delivery.message.metadata == {nasty: nasty}


def test_messages_published_before_a_group_exists_reach_it(queue, db, subscribe):
    queue.publish_many("t", [msg("old1"), msg("old2", key="q")])
    assert count(db, deliveries) == 0
    sub = subscribe("t", group="late")
    assert sorted(d.message.id for d in sub.fetch(10)) == ["old1", "old2"]
