"""``buildq dlq …`` on both backends: listing, the requeue round trip, filters, dry runs."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from buildq.queue.sql.schema import groups, messages
from tests.support.tables import execute, msg, rows, snapshot
from tests.support.waiting import wait_until


def _dead(queue, sub, mid: str, error: str = "boom", key: str = "p"):
    """Publish ``mid`` and have ``sub`` fail it until it is dead-lettered (max_attempts 3)."""
    queue.publish(sub.topic, msg(mid, key=key))
    for _ in range(3):
        [d] = wait_until(lambda: [x for x in sub.fetch(10) if x.message.id == mid])
        d.nack(0, error=error)


def test_a_poisoned_message_requeued_after_the_fix_is_processed_and_acked(
    cli, db, queue, subscribe
):
    sub = subscribe("buildsignal")
    fault = {"on": True}

    def handle(delivery):
        if fault["on"]:
            delivery.nack(0, error="runner said 500")
        else:
            delivery.ack()

    queue.publish("buildsignal", msg("b1/poll/1", key="b1", payload=b'{"b": 1}'))
    for _ in range(3):
        [d] = wait_until(lambda: sub.fetch(1))
        assert d.retry_count == _
        handle(d)
    [letter] = cli("dlq", "ls", "--topic", "buildsignal", "--json").data
    assert (letter["message_id"], letter["failed_group"]) == ("b1/poll/1", "g")
    assert (letter["failure_count"], letter["last_error"]) == (3, "runner said 500")
    assert cli("queue", "lag", "--topic", "buildsignal", "--json").data[0]["dead_letters"] == 1

    fault["on"] = False
    result = cli("dlq", "requeue", "--topic", "buildsignal", "--id", "b1/poll/1", "--yes")

    assert result.code == 0 and result.out.startswith("requeued 1, already gone 0, failed 0")
    [d] = wait_until(lambda: sub.fetch(1))
    assert (d.message.id, d.retry_count, d.message.payload) == ("b1/poll/1", 0, b'{"b": 1}')
    handle(d)
    [g] = cli("queue", "lag", "--topic", "buildsignal", "--json").data
    assert (g["pending"], g["dead_letters"]) == (0, 0)
    assert rows(db, "queue_messages", topic="buildsignal_dlq") == []


def test_requeue_puts_back_a_purged_original_for_the_failed_group_only(cli, db, queue, subscribe):
    sub = subscribe("t", group="g")
    other = subscribe("t", group="h")
    _dead(queue, sub, "gone", key="k")
    [d] = wait_until(lambda: other.fetch(1))
    d.ack()
    assert cli("queue", "purge", "--topic", "t", "--yes").code == 0

    requeued = cli("dlq", "requeue", "--topic", "t_dlq", "--all", "--yes", "--json").data

    assert [r["message_id"] for r in requeued["requeued"]] == ["gone"]
    [again] = wait_until(lambda: sub.fetch(1))
    assert (again.message.id, again.message.partition_key, again.retry_count) == ("gone", "k", 0)
    assert again.message.payload == b'{"n": 1}'
    assert other.fetch(10) == []
    [row] = rows(db, "queue_messages", topic="t")
    assert (row["dlq_group"], row["original_topic"], row["failed_at"]) == ("", None, None)


def test_requeue_resets_a_delivery_the_group_already_has(cli, db, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "a")
    sub.close()
    # An operator already reset the group's offset: the delivery exists with old failures.
    assert (
        cli("queue", "reset-offset", "--topic", "t", "--group", "g", "--to", "0", "--yes").code == 0
    )

    assert cli("dlq", "requeue", "--topic", "t", "--id", "a", "--yes").code == 0

    [delivery] = rows(db, "queue_deliveries", topic="t")
    assert (delivery["retry_count"], delivery["inflight"]) == (0, 0)
    assert rows(db, "queue_messages", topic="t_dlq") == []


def test_filters_pick_dead_letters_by_error_age_and_group(cli, db, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "timeout-1", error="build timed out after 2h")
    _dead(queue, sub, "auth-1", error="401 Unauthorized")
    execute(
        db,
        sa.update(messages)
        .where(messages.c.message_id == "auth-1")
        .values(failed_at=messages.c.failed_at - 3 * 86_400_000),
    )

    def ids(*filters: str) -> list[str]:
        letters = cli("dlq", "ls", "--topic", "t", *filters, "--json").data
        return [letter["message_id"] for letter in letters]

    assert ids() == ["timeout-1", "auth-1"]
    assert ids("--error-contains", "timed out") == ["timeout-1"]
    assert ids("--error-contains", "TIMED OUT") == []  # case-sensitive on both engines
    assert ids("--error-contains", "%") == []  # not a LIKE pattern
    assert ids("--older-than", "1d") == ["auth-1"]
    assert ids("--group", "h") == []
    assert ids("--limit", "1") == ["timeout-1"]
    result = cli(
        "dlq",
        "requeue",
        "--topic",
        "t",
        "--all",
        "--error-contains",
        "Unauthorized",
        "--rate",
        "1000/s",
        "--yes",
        "--json",
    ).data
    assert [r["message_id"] for r in result["requeued"]] == ["auth-1"]
    assert ids() == ["timeout-1"]


def test_dry_run_lists_and_changes_nothing(cli, db, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "a")
    _dead(queue, sub, "b")
    sub.close()
    before = snapshot(db)

    dry = cli("dlq", "requeue", "--topic", "t", "--all", "--dry-run", "--json").data
    text = cli("dlq", "requeue", "--topic", "t", "--id", "a", "--dry-run")

    assert [r["message_id"] for r in dry["would_requeue"]] == ["a", "b"]
    assert text.code == 0 and "would requeue 1" in text.out
    assert snapshot(db) == before


def test_a_letter_whose_group_is_gone_stays_and_exits_1(cli, db, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "a")
    sub.close()
    execute(db, sa.delete(groups))

    result = cli("dlq", "requeue", "--topic", "t", "--all", "--yes")

    assert result.code == 1 and "failed 1" in result.out
    assert "no longer exists" in result.out
    assert len(rows(db, "queue_messages", topic="t_dlq")) == 1
    assert rows(db, "queue_deliveries", topic="t") == []


def test_inspect_a_dead_letter_by_either_topic_name(cli, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "a", error="x" * 500)

    [by_original] = cli("dlq", "inspect", "--topic", "t", "--id", "a", "--json").data
    [by_dlq] = cli("dlq", "inspect", "--topic", "t_dlq", "--id", "a", "--group", "g", "--json").data
    listing = cli("dlq", "ls", "--topic", "t").out

    assert by_original == by_dlq
    assert (by_original["original_topic"], by_original["dlq_group"]) == ("t", "g")
    assert by_original["last_error"] == "x" * 500 and by_original["failure_count"] == 3
    assert "x" * 500 not in listing and "…" in listing  # cut in text, whole in JSON
    assert cli("dlq", "inspect", "--topic", "t", "--id", "a", "--group", "h").code == 1


def test_purge_needs_yes_and_honours_its_filters(cli, db, queue, subscribe):
    sub = subscribe("t")
    _dead(queue, sub, "old")
    _dead(queue, sub, "new")
    execute(
        db,
        sa.update(messages)
        .where(messages.c.message_id == "old")
        .values(failed_at=messages.c.failed_at - 7_200_000),
    )
    before = snapshot(db)

    refused = cli("dlq", "purge", "--topic", "t", "--older-than", "1h")
    assert refused.code != 0 and "refusing without --yes" in refused.err
    assert snapshot(db) == before
    purged = cli("dlq", "purge", "--topic", "t", "--older-than", "1h", "--yes", "--json").data

    assert purged == {"deleted": 1}
    assert [r["message_id"] for r in rows(db, "queue_messages", topic="t_dlq")] == ["new"]
    assert sorted(r["message_id"] for r in rows(db, "queue_messages", topic="t")) == ["new", "old"]


@pytest.mark.parametrize(
    "argv",
    [
        ["dlq", "requeue", "--topic", "t", "--all"],
        ["dlq", "requeue", "--topic", "t", "--id", "a"],
        ["dlq", "purge", "--topic", "t"],
    ],
)
def test_changes_without_yes_off_a_terminal_refuse(cli, db, queue, subscribe, argv):
    sub = subscribe("t")
    _dead(queue, sub, "a")
    sub.close()
    before = snapshot(db)

    result = cli(*argv)

    assert result.code != 0 and "refusing without --yes" in result.err
    assert snapshot(db) == before


def test_bad_rate_is_a_usage_error(cli):
    result = cli("dlq", "requeue", "--topic", "t", "--all", "--rate", "fast")
    assert result.code == 2 and "expected a rate like 10/s" in result.err
