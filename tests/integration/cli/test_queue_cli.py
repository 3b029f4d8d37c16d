"""``buildq queue …`` on both backends: reads parsed back from --json, repairs, confirmation."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from buildq.queue import DeliveryLost
from buildq.queue.sql import admin as admin_module
from buildq.queue.sql.leases import Membership
from buildq.queue.sql.schema import leases, subscribers
from tests.integration.cli.conftest import Terminal
from tests.support.database import FAST
from tests.support.tables import execute, msg, rows, snapshot
from tests.support.waiting import wait_until

HOSTILE = ["'; DROP TABLE queue_messages; --", 'say "hi"', "ビルド/β/1", "tab\there"]


def _group(stats: list[dict], topic: str, group: str) -> dict:
    [found] = [g for t in stats if t["topic"] == topic for g in t["groups"] if g["group"] == group]
    return found


def test_topics_counts_ready_delayed_in_flight_and_dead_letters(cli, queue, subscribe):
    sub = subscribe("t")
    for n in range(3):
        queue.publish("t", msg(f"m{n}"))
    queue.publish_after("t", msg("later"), 600_000)
    _in_flight, second = wait_until(lambda: sub.fetch(2) or None)
    second.reject("bad input")

    result = cli("queue", "topics", "--json")

    assert result.code == 0, result.err
    g = _group(result.data, "t", "g")
    assert (g["pending"], g["ready"], g["delayed"], g["in_flight"]) == (3, 1, 1, 1)
    assert g["dead_letters"] == 1 and g["slots"] == FAST.slots
    [t] = [t for t in result.data if t["topic"] == "t"]
    assert (t["messages"], t["dead_letters"]) == (4, 1)
    text = cli("queue", "topics").out
    assert text.splitlines()[0].split()[:3] == ["TOPIC", "MESSAGES", "GROUP"]
    assert any(line.split()[:3] == ["t", "4", "g"] for line in text.splitlines())


def test_stats_and_lag_of_one_topic(cli, queue, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("a", key="k1"))
    queue.publish("t", msg("b", key="k2"))
    [d] = wait_until(lambda: sub.fetch(1))
    d.nack(0, error="flaky")

    stats = cli("queue", "stats", "--topic", "t", "--json").data
    lag = cli("queue", "lag", "--topic", "t", "--json").data

    assert (stats["messages"], stats["partitions"]) == (2, 2)
    assert stats["last_offset"] > stats["first_offset"] > 0
    [g] = lag
    assert (g["group"], g["pending"], g["ready"], g["max_retry_count"]) == ("g", 2, 2, 1)
    assert 0 <= g["oldest_ready_age_ms"] < 60_000
    assert "MAX RETRY" in cli("queue", "lag", "--topic", "t").out
    assert cli("queue", "stats", "--topic", "nothing", "--json").data["messages"] == 0


def test_messages_newest_first_with_partition_and_limit(cli, queue):
    for n in range(4):
        queue.publish("t", msg(f"m{n}", key="even" if n % 2 == 0 else "odd"))

    listed = cli("queue", "messages", "--topic", "t", "--limit", "3", "--json").data
    even = cli("queue", "messages", "--topic", "t", "--partition", "even", "--json").data

    assert [m["message_id"] for m in listed] == ["m3", "m2", "m1"]
    assert [m["message_id"] for m in even] == ["m2", "m0"]
    assert cli("queue", "messages", "--topic", "t", "--limit", "0").code == 2


def test_inspect_shows_json_payloads_parsed_and_others_as_base64(cli, queue, subscribe):
    subscribe("t", group="g")
    subscribe("t", group="h")
    queue.publish("t", msg("j", key="k", payload='{"build": "ü"}'.encode(), src="cli"))
    queue.publish("t", msg("b", key="k", payload=b"\xff\x00binary"))

    [j] = cli("queue", "inspect", "--topic", "t", "--id", "j", "--json").data
    [b] = cli("queue", "inspect", "--topic", "t", "--id", "b", "--json").data

    assert (j["payload"], j["payload_encoding"], j["metadata"]) == (
        {"build": "ü"},
        "json",
        {"src": "cli"},
    )
    assert [d["group"] for d in j["deliveries"]] == ["g", "h"]
    assert j["deliveries"][0]["retry_count"] == 0 and j["done_groups"] == []
    assert (b["payload"], b["payload_encoding"]) == ("/wBiaW5hcnk=", "base64")
    assert '"build": "ü"' in cli("queue", "inspect", "--topic", "t", "--id", "j").out


def test_inspect_of_an_unknown_id_is_one_line_and_exit_1(cli):
    result = cli("queue", "inspect", "--topic", "t", "--id", "nope")
    assert result.code == 1 and result.out == ""
    assert result.err == "buildq: no message 'nope' in topic 't'\n"


@pytest.mark.parametrize("hostile", HOSTILE)
def test_hostile_ids_are_shown_verbatim(cli, queue, hostile):
    queue.publish("t", msg(hostile, key=hostile))

    [row] = cli("queue", "inspect", "--topic", "t", "--id", hostile, "--json").data
    text = cli("queue", "messages", "--topic", "t").out

    assert (row["message_id"], row["partition_key"]) == (hostile, hostile)
    shown = hostile.replace("\t", "\\t")  # control characters escaped, nothing else
    assert shown in text
    assert cli("queue", "delete", "--topic", "t", "--id", hostile, "--yes").code == 0
    assert cli("queue", "messages", "--topic", "t", "--json").data == []


def test_leases_stale_leases_and_release(cli, db):
    member = Membership(db, "t", "g", FAST, member_id="host:1:dead")
    member.join()
    held = cli("queue", "leases", "--topic", "t", "--json").data
    assert len(held) == FAST.slots
    assert {(lease["state"], lease["owner"]) for lease in held} == {("held", "host:1:dead")}
    # The member dies: its leases run out and its heartbeat stops (moved back in time).
    execute(db, sa.update(leases).values(expires_at=leases.c.expires_at - 3_600_000))
    execute(db, sa.update(subscribers).values(heartbeat_at=subscribers.c.heartbeat_at - 60_000))

    stale = cli("queue", "stale-leases", "--older-than", "30s", "--json").data
    text = cli("queue", "stale-leases").out
    released = cli(
        "queue",
        "release-lease",
        "--topic",
        "t",
        "--group",
        "g",
        "--slot",
        "0",
        "--slot",
        "1",
        "--yes",
        "--json",
    ).data

    assert len(stale["leases"]) == FAST.slots
    assert [s["id"] for s in stale["subscribers"]] == ["host:1:dead"]
    assert "host:1:dead" in text and "stale leases: 8" in text
    assert released == {"released": 2}
    after = cli("queue", "leases", "--group", "g", "--json").data
    assert [lease["state"] for lease in after].count("free") == 2
    assert (
        cli(
            "queue",
            "release-lease",
            "--topic",
            "t",
            "--group",
            "g",
            "--owner",
            "host:1:dead",
            "--yes",
        ).out
        == "released 6 lease(s)\n"
    )


def test_releasing_a_live_lease_fences_its_owner(cli, queue, subscribe):
    sub = subscribe("t")
    queue.publish("t", msg("a"))
    [d] = wait_until(lambda: sub.fetch(1))

    assert cli("queue", "release-lease", "--topic", "t", "--group", "g", "--all", "--yes").code == 0

    with pytest.raises(DeliveryLost):
        d.ack()


def test_reset_offset_redelivers_from_an_offset_and_skips_before_it(cli, db, queue, subscribe):
    sub = subscribe("t")
    for n in range(5):
        queue.publish("t", msg(f"m{n}"))
    for d in wait_until(lambda: sub.fetch(10)):
        d.ack()
    assert rows(db, "queue_deliveries") == []
    sub.close()
    offsets = [m["offset"] for m in cli("queue", "messages", "--topic", "t", "--json").data]
    third = sorted(offsets)[2]
    before = snapshot(db)

    reset = ("queue", "reset-offset", "--topic", "t", "--group", "g", "--to", str(third))
    dry = cli(*reset, "--dry-run", "--json").data
    assert snapshot(db) == before
    done = cli(*reset, "--yes", "--json").data

    assert (dry["added"], dry["skipped"], dry["dry_run"]) == (3, 0, True)
    assert (done["added"], done["skipped"]) == (3, 0)
    pending = rows(db, "queue_deliveries", grp="g")
    assert sorted(r["seq"] for r in pending) == sorted(offsets)[2:]
    latest = cli(
        "queue", "reset-offset", "--topic", "t", "--group", "g", "--to", "latest", "--yes", "--json"
    ).data
    assert (latest["added"], latest["skipped"]) == (0, 3)
    assert rows(db, "queue_deliveries", grp="g") == []
    missing = cli(
        "queue", "reset-offset", "--topic", "t", "--group", "nobody", "--to", "0", "--yes"
    )
    assert missing.code == 1 and "does not exist" in missing.err


def test_publish_validates_json_and_reports_duplicates(cli, db, tmp_path, subscribe):
    sub = subscribe("t")
    publish = ("queue", "publish", "--topic", "t", "--id", "x/poll/1", "--partition", "x")
    first = cli(
        *publish,
        "--payload",
        '{"step": 1}',
        "--metadata",
        "who=oncall",
        "--metadata",
        "a=b=c",
        "--json",
    )
    (tmp_path / "p.json").write_text('{"step": 1}')
    again = cli(*publish, "--payload-file", str(tmp_path / "p.json"))

    assert first.code == 0 and first.data["duplicate"] is False
    assert again.code == 0 and "duplicate" in again.out
    [d] = wait_until(lambda: sub.fetch(1))
    assert (d.message.payload, dict(d.message.metadata)) == (
        b'{"step": 1}',
        {"who": "oncall", "a": "b=c"},
    )
    bad = cli(
        "queue", "publish", "--topic", "t", "--id", "y", "--partition", "x", "--payload", "{nope"
    )
    assert bad.code == 2 and bad.err.startswith("buildq: --payload is not JSON")
    to_dlq = cli(
        "queue", "publish", "--topic", "t_dlq", "--id", "y", "--partition", "x", "--payload", "{}"
    )
    assert to_dlq.code == 2 and len(rows(db, "queue_messages")) == 1


def test_publish_with_a_delay_is_not_delivered_early(cli, queue, subscribe):
    sub = subscribe("t")
    result = cli(
        "queue",
        "publish",
        "--topic",
        "t",
        "--id",
        "later",
        "--partition",
        "x",
        "--payload",
        "1",
        "--delay-ms",
        "600000",
    )
    assert result.code == 0
    assert sub.fetch(10) == []
    assert cli("queue", "lag", "--topic", "t", "--json").data[0]["delayed"] == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["queue", "delete", "--topic", "t", "--id", "m0"],
        ["queue", "purge", "--topic", "t"],
        ["queue", "reset-offset", "--topic", "t", "--group", "g", "--to", "latest"],
        ["queue", "release-lease", "--topic", "t", "--group", "g", "--all"],
    ],
)
def test_changes_without_yes_off_a_terminal_refuse_and_change_nothing(cli, db, queue, argv):
    Membership(db, "t", "g", FAST, member_id="m").join()
    queue.publish("t", msg("m0"))
    before = snapshot(db)

    result = cli(*argv)

    assert result.code != 0 and "refusing without --yes" in result.err
    assert snapshot(db) == before


def test_a_terminal_is_asked_and_no_means_no(cli, db, queue):
    queue.publish("t", msg("m0"))
    before = snapshot(db)

    declined = cli("queue", "purge", "--topic", "t", stdin=Terminal("n\n"))
    assert declined.code == 1 and "cancelled" in declined.err
    assert snapshot(db) == before
    accepted = cli("queue", "purge", "--topic", "t", stdin=Terminal("y\n"))
    assert accepted.code == 0 and "deleted 1 message(s)" in accepted.out
    assert rows(db, "queue_messages") == []


def test_delete_and_purge_remove_messages_with_their_deliveries(
    cli, db, queue, subscribe, monkeypatch
):
    monkeypatch.setattr(admin_module, "BATCH", 2)  # several short transactions
    subscribe("t")
    for n in range(5):
        queue.publish("t", msg("same", key=f"k{n}"))
    queue.publish("other", msg("keep"))

    one = cli(
        "queue", "delete", "--topic", "t", "--id", "same", "--partition", "k0", "--yes", "--json"
    )
    purged = cli("queue", "purge", "--topic", "t", "--yes", "--json")

    assert one.data["deleted"] == 1 and purged.data == {"deleted": 4}
    assert [r["topic"] for r in rows(db, "queue_messages")] == ["other"]
    assert rows(db, "queue_deliveries", topic="t") == []
    gone = cli("queue", "delete", "--topic", "t", "--id", "same", "--yes")
    assert gone.code == 1 and gone.err.startswith("buildq: no message")


def test_bad_urls_and_durations_are_one_line_errors(cli):
    assert "cannot be parsed" in cli("queue", "topics", "--url", "::nope::", url=False).err
    bad = cli("queue", "stale-leases", "--older-than", "soon")
    assert bad.code == 2 and "expected a duration" in bad.err
