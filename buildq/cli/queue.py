"""``buildq queue …``: see and repair the message queue without writing SQL.

Reads print aligned tables (``--json`` for machines); anything that changes the queue, except
``publish``, asks first on a terminal and wants ``--yes`` otherwise. Tables, durations and the
sub-command plumbing shared with ``buildq dlq`` are in ``output.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from buildq.cli import argtypes, common
from buildq.cli.output import (
    add_command,
    emit,
    format_duration,
    print_fields,
    print_table,
    report,
    show_messages,
    topic_command,
)
from buildq.queue.contract import Message, is_dlq_topic
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.queue import SqlQueue
from buildq.queue.sql.stats import TopicStats

_GROUP_COLUMNS = [
    ("pending", "PENDING"),
    ("ready", "READY"),
    ("delayed", "DELAYED"),
    ("in_flight", "IN FLIGHT"),
    ("dead_letters", "DLQ"),
    ("oldest_ready_age_ms", "OLDEST READY"),
    ("max_retry_count", "MAX RETRY"),
]


def register(commands: Any) -> None:
    parser = commands.add_parser("queue", help="inspect and repair the message queue")
    sub = parser.add_subparsers(dest="queue_command", metavar="ACTION", required=True)
    add_command(sub, "topics", _topics, "messages and deliveries per topic and group")
    topic_command(sub, "stats", _stats, "size of one topic and its groups' progress")
    p = topic_command(sub, "messages", _messages, "the newest messages of a topic")
    p.add_argument("--partition", metavar="KEY", help="only this partition key")
    p.add_argument("--limit", type=argtypes.positive_int, default=50, help="at most N (default 50)")
    p = topic_command(sub, "inspect", _inspect, "one message in full, with its deliveries")
    p.add_argument("--id", required=True, help="message id")
    p.add_argument("--partition", metavar="KEY", help="only this partition key")
    topic_command(sub, "lag", _lag, "per group: not yet acked, ready, oldest ready age")
    _register_leases(sub)
    _register_changes(sub)


def _register_leases(sub: Any) -> None:
    p = add_command(sub, "leases", _leases, "who holds which slot of each group")
    p.add_argument("--topic")
    p.add_argument("--group")
    p = add_command(sub, "stale-leases", _stale, "expired leases and silent members")
    p.add_argument(
        "--older-than",
        type=argtypes.duration_ms,
        default=30_000,
        metavar="DURATION",
        help="a member is silent after this long without a heartbeat (default 30s)",
    )
    p = topic_command(sub, "release-lease", _release, "free leases of a group", confirm=True)
    p.add_argument("--group", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--slot", type=argtypes.slot, action="append", help="this slot (repeatable)")
    which.add_argument("--owner", metavar="MEMBER", help="every lease this member holds")
    which.add_argument("--all", action="store_true", help="every lease of the group")


def _register_changes(sub: Any) -> None:
    p = topic_command(sub, "reset-offset", _reset, "move a group's position", confirm=True)
    p.add_argument("--group", required=True)
    p.add_argument(
        "--to",
        required=True,
        type=argtypes.offset,
        metavar="OFFSET",
        help="an offset, 'earliest' or 'latest'",
    )
    p.add_argument("--dry-run", action="store_true", help="print the counts only")
    p = topic_command(sub, "publish", _publish, "publish one message by hand")
    p.add_argument("--id", required=True, help="message id")
    p.add_argument("--partition", required=True, metavar="KEY", help="partition key")
    body = p.add_mutually_exclusive_group(required=True)
    body.add_argument("--payload", metavar="JSON", help="the payload, a JSON document")
    body.add_argument("--payload-file", type=Path, metavar="PATH", help="read the JSON here")
    p.add_argument(
        "--metadata",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a metadata entry (repeatable)",
    )
    p.add_argument(
        "--delay-ms",
        type=argtypes.delay_ms,
        default=0,
        help="invisible for this long (at most 3650 days)",
    )
    p = topic_command(sub, "delete", _delete, "delete a message and its deliveries", confirm=True)
    p.add_argument("--id", required=True, help="message id")
    p.add_argument("--partition", metavar="KEY", help="only this partition key")
    topic_command(sub, "purge", _purge, "delete every message of a topic", confirm=True)


# --- reads ---------------------------------------------------------------------------------


def _topics(args: argparse.Namespace, admin: QueueAdmin) -> int:
    stats = admin.topic_stats()
    if args.json:
        common.print_json([_topic_json(s) for s in stats])
    else:
        print_table(
            _group_rows(stats),
            [("topic", "TOPIC"), ("messages", "MESSAGES"), ("group", "GROUP"), *_GROUP_COLUMNS],
        )
    return 0


def _stats(args: argparse.Namespace, admin: QueueAdmin) -> int:
    summary = admin.topic_summary(args.topic)
    [stats] = [s for s in admin.topic_stats(args.topic) if s.topic == args.topic] or [
        TopicStats(args.topic)
    ]
    if args.json:
        common.print_json({"topic": args.topic, **summary, **_topic_json(stats)})
        return 0
    print_fields({"topic": args.topic, **summary, "dead_letters": stats.dead_letters})
    if stats.groups:
        print()
        print_table(_group_rows([stats]), [("group", "GROUP"), *_GROUP_COLUMNS])
    return 0


def _messages(args: argparse.Namespace, admin: QueueAdmin) -> int:
    rows = admin.messages(args.topic, partition_key=args.partition, limit=args.limit)
    failed = [("dlq_group", "FAILED GROUP")] if is_dlq_topic(args.topic) else []
    return emit(args, rows, [*_MESSAGE_COLUMNS[:3], *failed, *_MESSAGE_COLUMNS[3:]])


_MESSAGE_COLUMNS = [
    ("offset", "OFFSET"),
    ("partition_key", "PARTITION"),
    ("message_id", "ID"),
    ("created_at_ms", "CREATED"),
    ("visible_after_ms", "VISIBLE AFTER"),
    ("payload_bytes", "BYTES"),
    ("pending_groups", "PENDING GROUPS"),
]


def _inspect(args: argparse.Namespace, admin: QueueAdmin) -> int:
    return show_messages(args, admin.inspect(args.topic, args.id, partition_key=args.partition))


def _lag(args: argparse.Namespace, admin: QueueAdmin) -> int:
    groups = [dataclasses.asdict(g) for g in admin.lag(args.topic)]
    return emit(args, groups, [("group", "GROUP"), *_GROUP_COLUMNS])


def _leases(args: argparse.Namespace, admin: QueueAdmin) -> int:
    return emit(args, admin.leases(args.topic, args.group), _LEASE_COLUMNS)


_LEASE_COLUMNS = [
    ("topic", "TOPIC"),
    ("group", "GROUP"),
    ("slot", "SLOT"),
    ("state", "STATE"),
    ("owner", "OWNER"),
    ("epoch", "EPOCH"),
    ("expires_in_ms", "EXPIRES IN"),
]


def _stale(args: argparse.Namespace, admin: QueueAdmin) -> int:
    found = admin.stale(args.older_than)
    if args.json:
        common.print_json(found)
        return 0
    print(f"stale leases: {len(found['leases'])}")
    print_table(found["leases"], _LEASE_COLUMNS)
    print(
        f"\nsilent members (no heartbeat for {format_duration(args.older_than)}): "
        f"{len(found['subscribers'])}"
    )
    print_table(
        found["subscribers"],
        [
            ("id", "MEMBER"),
            ("topic", "TOPIC"),
            ("group", "GROUP"),
            ("host", "HOST"),
            ("pid", "PID"),
            ("heartbeat_at_ms", "LAST HEARTBEAT"),
            ("silent_for_ms", "SILENT FOR"),
        ],
    )
    return 0


# --- changes -------------------------------------------------------------------------------


def _release(args: argparse.Namespace, admin: QueueAdmin) -> int:
    which = (
        f"slots {', '.join(map(str, args.slot))}"
        if args.slot
        else f"every lease held by {args.owner!r}"
        if args.owner
        else "every lease"
    )
    common.confirm(args, f"release {which} of group {args.group!r} on {args.topic!r}?")
    released = admin.release_leases(args.topic, args.group, slots=args.slot, owner=args.owner)
    return report(args, {"released": released}, f"released {released} lease(s)")


def _reset(args: argparse.Namespace, admin: QueueAdmin) -> int:
    offset = args.to
    if offset == "latest":
        offset = (admin.last_offset(args.topic) or 0) + 1
    elif offset == "earliest":
        offset = 0
    counts = admin.reset_offset(args.topic, args.group, offset, dry_run=True)
    text = (
        f"group {args.group!r} on {args.topic!r} to offset {offset}: "
        f"{counts.added} message(s) to deliver again, {counts.skipped} pending to skip"
    )
    if not args.dry_run:
        common.confirm(args, f"reset {text}?")
        counts = admin.reset_offset(args.topic, args.group, offset, dry_run=False)
        text = (
            f"reset group {args.group!r} on {args.topic!r} to offset {offset}: "
            f"{counts.added} delivery(ies) added, {counts.skipped} skipped"
        )
    data = {"offset": offset, "dry_run": args.dry_run, **dataclasses.asdict(counts)}
    return report(args, data, ("would reset " if args.dry_run else "") + text)


def _publish(args: argparse.Namespace, admin: QueueAdmin) -> int:
    if is_dlq_topic(args.topic):
        raise common.CliError("dead letters are made by the queue: publish to the original topic")
    text = args.payload if args.payload is not None else _read(args.payload_file)
    try:
        json.loads(text)
    except ValueError as err:
        raise common.CliError(f"--payload is not JSON: {str(err)[:200]}") from None
    except RecursionError:
        raise common.CliError("--payload is JSON nested too deeply") from None
    metadata = dict(_key_value(item) for item in args.metadata)
    message = Message(args.id, text.encode("utf-8"), args.partition, metadata)
    result = SqlQueue(admin.db).publish_after(args.topic, message, args.delay_ms)
    data = {"topic": args.topic, **dataclasses.asdict(result)}
    what = "duplicate: the id exists, nothing written" if result.duplicate else "published"
    return report(args, data, f"{what} ({args.topic} / {args.partition} / {args.id})")


def _delete(args: argparse.Namespace, admin: QueueAdmin) -> int:
    offsets = admin.find_offsets(args.topic, args.id, args.partition)
    if not offsets:
        raise common.CliError(f"no message {args.id!r} in topic {args.topic!r}", exit_code=1)
    common.confirm(
        args,
        f"delete {len(offsets)} message(s) {args.id!r} from {args.topic!r} with their deliveries?",
    )
    deleted = admin.delete_offsets(offsets)
    return report(args, {"deleted": deleted, "offsets": offsets}, f"deleted {deleted} message(s)")


def _purge(args: argparse.Namespace, admin: QueueAdmin) -> int:
    count = admin.topic_summary(args.topic)["messages"]
    common.confirm(
        args, f"delete all {count} message(s) of topic {args.topic!r} and their deliveries?"
    )
    deleted = admin.purge_topic(args.topic)
    return report(args, {"deleted": deleted}, f"deleted {deleted} message(s) of {args.topic!r}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise common.CliError(f"cannot read {path}: {err}") from None


def _key_value(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise common.CliError(f"--metadata {item!r}: expected KEY=VALUE")
    return key, value


def _topic_json(stats: TopicStats) -> dict[str, Any]:
    return {
        "topic": stats.topic,
        "messages": stats.messages,
        "dead_letters": stats.dead_letters,
        "groups": [dataclasses.asdict(g) for g in stats.groups],
    }


def _group_rows(stats: Sequence[TopicStats]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for topic in stats:
        head = {"topic": topic.topic, "messages": topic.messages}
        rows += [head | dataclasses.asdict(g) for g in topic.groups] or [head]
    return rows


# --- shared with the other admin commands ---------------------------------------------------
