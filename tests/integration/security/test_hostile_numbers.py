"""Absurd numbers and durations on the command line: one ``buildq: …`` line and exit 2, on both
backends (issue 14, item 7).

Before, they reached SQL: SQLite raised OverflowError (a traceback), MariaDB answered a raw
syntax error for a negative LIMIT and silently stored a huge delay as the largest BIGINT.
Now every numeric option is parsed by one set of ``type=`` helpers (``buildq.cli.argtypes``)
with bounds the database can hold, and argparse's usage errors are one line too.
"""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.support.cli import Cli
from tests.support.daemon import World

HUGE = "1" + "0" * 29
THOUSANDS_OF_DIGITS = "9" * 5000
PUBLISH = ("queue", "publish", "--topic", "t", "--id", "i", "--partition", "p", "--payload", "{}")
SUBMIT = ("submit", "--queue", "main", "--head", "c", "--wait")

ABSURD = {
    "delay-exponent": ("--delay-ms", "1e30", PUBLISH),
    "delay-huge": ("--delay-ms", HUGE, PUBLISH),
    "delay-negative": ("--delay-ms", "-5", PUBLISH),
    "dlq-older-than-huge": ("--older-than", f"{HUGE}d", ("dlq", "ls", "--topic", "t")),
    "dlq-older-than-digits": ("--older-than", f"{THOUSANDS_OF_DIGITS}s", ("dlq", "ls", "--topic", "t")),
    "dlq-purge-older-than": ("--older-than", f"{HUGE}h", ("dlq", "purge", "--topic", "t", "--yes")),
    "dlq-limit": ("--limit", HUGE, ("dlq", "ls", "--topic", "t")),
    "dlq-rate-huge": ("--rate", "1" + "0" * 400, ("dlq", "requeue", "--topic", "t", "--all", "--dry-run")),
    "dlq-rate-tiny": ("--rate", "0.000000001", ("dlq", "requeue", "--topic", "t", "--all", "--dry-run")),
    "builds-limit-exponent": ("--limit", "1e20", ("builds", "ls")),
    "builds-limit-huge": ("--limit", "100000000000000000000", ("builds", "ls")),
    "builds-limit-negative": ("--limit", "-1", ("builds", "ls")),
    "builds-limit-zero": ("--limit", "0", ("builds", "ls")),
    "builds-limit-digits": ("--limit", THOUSANDS_OF_DIGITS, ("builds", "ls")),
    "messages-limit": ("--limit", HUGE, ("queue", "messages", "--topic", "t")),
    "stale-older-than": ("--older-than", f"{HUGE}d", ("queue", "stale-leases")),
    "release-slot-huge": ("--slot", HUGE, ("queue", "release-lease", "--topic", "t", "--group", "g", "--yes")),
    "release-slot-negative": ("--slot", "-1", ("queue", "release-lease", "--topic", "t", "--group", "g", "--yes")),
    "reset-offset-huge": ("--to", HUGE, ("queue", "reset-offset", "--topic", "t", "--group", "g", "--dry-run")),
    "submit-timeout-nan": ("--timeout", "nan", SUBMIT),
    "submit-timeout-inf": ("--timeout", "inf", SUBMIT),
    "submit-timeout-negative": ("--timeout", "-1", SUBMIT),
    "watch-interval-negative": ("--interval", "-1", ("watch", "--once")),
    "watch-interval-zero": ("--interval", "0", ("watch", "--once")),
}  # fmt: skip


def message_rows(world: World) -> int:
    return int(world.rows("SELECT COUNT(*) AS n FROM queue_messages")[0].n)


@pytest.mark.parametrize(("option", "value", "command"), list(ABSURD.values()), ids=list(ABSURD))
def test_absurd_numbers_are_one_line_and_exit_2(
    cli: Cli, world: World, option: str, value: str, command: tuple[str, ...]
) -> None:
    result = cli(*command, option, value)
    assert result.refused_cleanly() and result.code == 2, (result.code, result.err[:2000])
    assert f"argument {option}" in result.err, result.err
    assert len(result.err) < 500, "a refused value is quoted short"
    assert message_rows(world) == 0, "nothing was published"


def test_web_port_out_of_range_is_one_line(cli: Cli) -> None:
    result = cli("web", "--port", "99999", url=False)
    assert result.refused_cleanly() and result.code == 2, result.err
    assert "--port" in result.err


def test_usage_errors_are_one_line(cli: Cli) -> None:
    for argv in (("queue", "nope"), ("builds", "ls", "--bogus"), ("queue", "publish")):
        result = cli(*argv)
        assert result.refused_cleanly() and result.code == 2, (argv, result.err)


def test_the_bounds_themselves_are_accepted_and_stored(cli: Cli, world: World) -> None:
    """The largest delay is stored as asked (no clamping) and shown as a date."""
    published = cli(*PUBLISH, "--delay-ms", "315360000000", "--json")
    assert published.code == 0, published.err
    [row] = world.rows("SELECT visible_after, created_at FROM queue_messages")
    assert row.visible_after == row.created_at + 315_360_000_000
    shown = cli("queue", "messages", "--topic", "t")
    assert shown.code == 0 and "Z" in shown.out.splitlines()[1], shown.out
    for argv in (
        ("builds", "ls", "--limit", "1000000"),
        ("dlq", "ls", "--topic", "t", "--older-than", "3650d"),
        ("queue", "stale-leases", "--older-than", "3650d"),
    ):
        result = cli(*argv)
        assert result.code == 0, (argv, result.err)


def test_a_stored_time_past_year_9999_is_shown_not_a_traceback(
    cli: Cli, world: World, backend_url: str
) -> None:
    """What MariaDB stored for an absurd delay before it was refused: the largest BIGINT."""
    assert cli(*PUBLISH).code == 0
    engine = sa.create_engine(backend_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE queue_messages SET visible_after = 9223372036854775807"))
    engine.dispose()
    shown = cli("queue", "messages", "--topic", "t")
    assert shown.code == 0, shown.err
    assert "9223372036854775807 ms" in shown.out
