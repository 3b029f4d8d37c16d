"""Shared by ``buildq queue`` and ``buildq dlq``: sub-command plumbing, tables, durations."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.cells import cell_len

from buildq.cli import common
from buildq.cli.argtypes import UNITS_MS
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.messages import MessageStore
from buildq.storage.database import Database

Handler = Callable[[argparse.Namespace, QueueAdmin], int]


def add_command(
    sub: Any, name: str, handler: Handler, help: str, *, confirm: bool = False
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help, description=help)
    common.add_target_options(parser)
    common.add_json_option(parser)
    if confirm:
        common.add_yes_option(parser)
    parser.set_defaults(handler=lambda args: with_admin(args, handler))
    return parser


def topic_command(
    sub: Any,
    name: str,
    handler: Handler,
    help: str,
    *,
    confirm: bool = False,
    topic: Callable[[str], str] = str,
    topic_help: str | None = None,
) -> argparse.ArgumentParser:
    """``add_command`` with a required ``--topic`` (``topic`` parses it)."""
    parser = add_command(sub, name, handler, help, confirm=confirm)
    parser.add_argument("--topic", required=True, type=topic, help=topic_help)
    return parser


def with_admin(args: argparse.Namespace, handler: Handler) -> int:
    def run(db: Database) -> int:
        return handler(args, QueueAdmin(db, MessageStore(db)))

    return common.run_db(args, run)


def show_messages(args: argparse.Namespace, rows: list[dict[str, Any]]) -> int:
    """``inspect``: every matching row in full; exit 1 when there is none."""
    if not rows:
        raise common.CliError(f"no message {args.id!r} in topic {args.topic!r}", exit_code=1)
    if args.json:
        common.print_json(rows)
        return 0
    for number, row in enumerate(rows):
        if number:
            print()
        deliveries = row.pop("deliveries")
        payload = row.pop("payload")
        print_fields(row)
        print("payload:")
        text = json.dumps(payload, indent=2, ensure_ascii=False)
        print(
            "  " + text.replace("\n", "\n  ")
            if row["payload_encoding"] == "json"
            else "  " + str(payload)
        )
        print("deliveries:" if deliveries else "deliveries: none pending")
        print_table(
            deliveries,
            [
                ("group", "GROUP"),
                ("slot", "SLOT"),
                ("in_flight", "IN FLIGHT"),
                ("visible_at_ms", "VISIBLE AT"),
                ("attempt", "ATTEMPT"),
                ("retry_count", "RETRIES"),
                ("owner", "OWNER"),
                ("last_error", "LAST ERROR"),
            ],
        )
    return 0


def emit(
    args: argparse.Namespace, rows: list[dict[str, Any]], columns: Sequence[tuple[str, str]]
) -> int:
    """A read's rows: as JSON with --json, else as a table."""
    if args.json:
        common.print_json(rows)
    else:
        print_table(rows, columns)
    return 0


def report(args: argparse.Namespace, data: dict[str, Any], text: str) -> int:
    if args.json:
        common.print_json(data)
    else:
        print(text)
    return 0


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> None:
    """Left-aligned columns, widths measured in terminal cells (wide characters count 2)."""
    if not rows:
        return
    cells = [[header for _, header in columns]]
    cells += [[cell(key, row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(cell_len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        padded = [
            text + " " * (width - cell_len(text)) for text, width in zip(line, widths, strict=True)
        ]
        print("  ".join(padded).rstrip())


def print_fields(row: dict[str, Any]) -> None:
    width = max(len(key) for key in row)
    for key, value in row.items():
        text = (
            json.dumps(value, ensure_ascii=False) if isinstance(value, dict) else cell(key, value)
        )
        print(f"{key.ljust(width)}  {text}")


_MAX_CELL = 60


def cell(key: str, value: Any, *, limit: int = _MAX_CELL) -> str:
    """One value for a human: times as UTC, durations with units, control characters
    escaped (a message id must not move the cursor), long errors cut."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_at_ms") or key == "visible_after_ms":
        return format_time(int(value))
    if key.endswith(("_age_ms", "_in_ms", "_for_ms")):
        return format_duration(int(value))
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(value))
    if key == "last_error" and len(text) > limit:
        return text[: limit - 1] + "…"
    return text


def format_time(epoch_ms: int) -> str:
    if epoch_ms <= 0:
        return "-"
    try:
        moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    except (ValueError, OverflowError, OSError):
        # Past year 9999: a row written around the CLI (or by a version that let any delay
        # through, which MariaDB clamps to the largest BIGINT). Show it, don't crash on it.
        return f"{epoch_ms} ms"
    return moment.strftime("%Y-%m-%d %H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


def format_duration(ms: int) -> str:
    sign, ms = ("-" if ms < 0 else ""), abs(ms)
    for unit in ("d", "h", "m", "s"):
        if ms >= UNITS_MS[unit]:
            return f"{sign}{ms / UNITS_MS[unit]:.1f}{unit}".replace(".0" + unit, unit)
    return f"{sign}{ms}ms"
