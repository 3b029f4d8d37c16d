"""``buildq dlq …``: list, inspect, requeue and purge dead letters.

``--topic`` names the original topic (``buildsignal``); its DLQ topic's name is accepted too.
A requeue sends each dead letter back to the consumer group that failed it, as a fresh
delivery (retry count 0), and removes the dead letter; one transaction per message.
"""

from __future__ import annotations

import argparse
from typing import Any

from buildq.cli import argtypes, common
from buildq.cli.output import (
    emit,
    print_table,
    report,
    show_messages,
    topic_command,
)
from buildq.queue.contract import dlq_topic
from buildq.queue.sql.admin import DeadLetterFilter, QueueAdmin, original_topic

_COLUMNS = [
    ("offset", "OFFSET"),
    ("message_id", "ID"),
    ("partition_key", "PARTITION"),
    ("failed_group", "FAILED GROUP"),
    ("failure_count", "FAILURES"),
    ("failed_at_ms", "FAILED AT"),
    ("last_error", "LAST ERROR"),
]


def register(commands: Any) -> None:
    parser = commands.add_parser("dlq", help="dead letters: list, inspect, requeue, purge")
    sub = parser.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    p = _command(sub, "ls", _ls, "dead letters of a topic, oldest first")
    _add_filters(p)
    p.add_argument(
        "--limit", type=argtypes.positive_int, default=100, help="at most N (default 100)"
    )
    p = _command(sub, "inspect", _inspect, "one dead letter in full")
    p.add_argument("--id", required=True, help="message id")
    p.add_argument("--partition", metavar="KEY", help="only this partition key")
    p.add_argument("--group", help="only the letter this consumer group left")
    p = _command(sub, "requeue", _requeue, "send dead letters back to be processed", True)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the dead letter(s) with this message id")
    which.add_argument("--all", action="store_true", help="every dead letter the filters match")
    _add_filters(p, with_id=False)
    p.add_argument("--dry-run", action="store_true", help="list what would be requeued")
    p.add_argument(
        "--rate", type=argtypes.rate, metavar="N/s", help="at most N messages per second"
    )
    p = _command(sub, "purge", _purge, "delete dead letters for good", True)
    _add_filters(p)


def _command(
    sub: Any, name: str, handler: Any, help: str, confirm: bool = False
) -> argparse.ArgumentParser:
    return topic_command(
        sub, name, handler, help, confirm=confirm, topic=original_topic, topic_help="original topic"
    )


def _add_filters(parser: argparse.ArgumentParser, *, with_id: bool = True) -> None:
    if with_id:
        parser.add_argument("--id", help="only this message id")
    parser.add_argument("--partition", metavar="KEY", help="only this partition key")
    parser.add_argument("--group", help="only letters this consumer group left")
    parser.add_argument("--error-contains", metavar="TEXT", help="last error contains TEXT")
    parser.add_argument(
        "--older-than",
        type=argtypes.duration_ms,
        metavar="DURATION",
        help="failed longer ago (2h, 1d)",
    )


def _filter(args: argparse.Namespace) -> DeadLetterFilter:
    return DeadLetterFilter(
        message_id=args.id,
        partition_key=args.partition,
        group=args.group,
        error_contains=args.error_contains,
        older_than_ms=args.older_than,
    )


def _ls(args: argparse.Namespace, admin: QueueAdmin) -> int:
    return emit(args, admin.dead_letters(args.topic, _filter(args), limit=args.limit), _COLUMNS)


def _inspect(args: argparse.Namespace, admin: QueueAdmin) -> int:
    rows = admin.inspect(
        dlq_topic(args.topic), args.id, partition_key=args.partition, group=args.group
    )
    return show_messages(args, rows)


def _requeue(args: argparse.Namespace, admin: QueueAdmin) -> int:
    where = _filter(args)
    letters = admin.dead_letters(args.topic, where)
    if args.dry_run or not letters:
        if args.json:
            common.print_json({"dry_run": args.dry_run, "would_requeue": letters})
        else:
            verb = "would requeue" if args.dry_run else "nothing to requeue:"
            print(f"{verb} {len(letters)} dead letter(s) of {args.topic!r}")
            print_table(letters, _COLUMNS)
        return 0
    common.confirm(args, f"requeue {len(letters)} dead letter(s) of {args.topic!r}?")
    result = admin.requeue(args.topic, where, rate_per_s=args.rate)
    data = {
        "dry_run": False,
        "requeued": result.requeued,
        "gone": result.gone,
        "failed": result.failed,
    }
    text = (
        f"requeued {len(result.requeued)}, already gone {len(result.gone)}, "
        f"failed {len(result.failed)}"
    )
    report(args, data, text)
    if result.failed and not args.json:
        print_table(result.failed, [*_COLUMNS[:4], ("reason", "REASON")])
    return 1 if result.failed else 0


def _purge(args: argparse.Namespace, admin: QueueAdmin) -> int:
    where = _filter(args)
    count = len(admin.dead_letters(args.topic, where))
    common.confirm(args, f"delete {count} dead letter(s) of {args.topic!r} for good?")
    deleted = admin.purge_dead_letters(args.topic, where)
    return report(args, {"deleted": deleted}, f"deleted {deleted} dead letter(s)")
