"""Hostile values through the CLI and the config: stored and shown verbatim, or refused with
one clear line — never executed, never a traceback.

Quotes and SQL fragments must reach the database as data (every statement binds its
values); unicode, NULs, control characters and rich markup must come back as they went in;
10 MB values and empty strings are refused with a message that says which limit; bytes that
are not UTF-8 are refused before any command sees them.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from buildq.buildrunner import Change
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.orchestrator.sqlbatch import SqlBuildBatch
from buildq.queue.contract import InvalidMessage, Message
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database
from tests.support.cli import Cli
from tests.support.daemon import BUILDQ, MakeDaemon, World
from tests.support.waiting import wait_until

HOSTILE = [
    "'; DROP TABLE builds; --",
    '" OR "1"="1',
    "Robert'); DELETE FROM queue_messages; --",
    "x' UNION SELECT * FROM queue_leases --",
    "[/]",
    "[bold red]markup[/bold red]",
    "ünïcödé ✓ 𝕏 🙈 \u202eevil",
    "tab\there\nnewline\r\n",
    "back\\slash %s %d %n {0} {}",
    "a\x00b",
    "$(rm -rf /) `id` ${HOME}",
    "\x1b[31mred\x1b[0m",
]
TEN_MB = "x" * 10_000_000
TABLES = ("builds", "queue_messages", "queue_deliveries", "queue_leases", "queue_groups")


def table_counts(world: World) -> dict[str, int]:
    return {t: int(world.rows(f"SELECT COUNT(*) AS n FROM {t}")[0].n) for t in TABLES}  # noqa: S608


def store_build(db: Database, n: int, value: str) -> str:
    """A triggered build whose every caller-given field is ``value``; its request id."""
    request_id = f"{value[:150]}#{n}"
    request = BuildRequest(
        request_id,
        "main",
        (Change(value or "base", value),),
        (Change(f"{value}#head", value, {value or "k": value}),),
        {value or "k": value, "requester": value},
    )
    db.write(
        lambda c: SqlBuildBatch(c, 1_000, immediate=True).insert_triggered(
            request, f"build-{n}", "sim"
        )
    )
    return request_id


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_are_stored_and_shown_verbatim(
    cli: Cli, db: Database, world: World, value: str
) -> None:
    request_id = store_build(db, 1, value)
    before = table_counts(world)
    shown = cli("builds", "show", request_id, "--json")
    assert shown.code == 0, shown.err
    build = shown.data
    assert build["request_id"] == request_id
    assert build["request_metadata"]["requester"] == value
    assert build["head"][0] == {
        "id": f"{value}#head",
        "revision": value,
        "extra": {value or "k": value},
    }
    assert build["base"][0]["revision"] == value
    listed = cli("builds", "ls", "--json")
    assert [b["request_id"] for b in listed.data] == [request_id]
    text = cli("builds", "show", request_id)
    assert text.code == 0 and value.splitlines()[0] in text.out
    watched = cli("watch", "--once")
    assert watched.code == 0, watched.err  # rich markup in a value is text, not markup
    # The same value as a lookup key, a queue and a topic: not found, nothing executed.
    for argv in (
        ("builds", "show", value),
        ("cancel", value),
        ("builds", "ls", "--queue", value),
        ("queue", "messages", "--topic", value),
        ("queue", "inspect", "--topic", "build", "--id", value),
        ("dlq", "ls", "--topic", value),
    ):
        result = cli(*argv)
        assert result.code == 0 or result.refused_cleanly(), (argv, result)
    assert table_counts(world) == before


@pytest.mark.parametrize("value", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_values_in_a_submitted_request_reach_the_queue_verbatim(
    cli: Cli, value: str
) -> None:
    request_id = f"{value[:150]}#submitted"
    submitted = cli(
        "submit", "--queue", "main", "--head", f"c{value}@{value}", "--request-id", request_id,
        "--meta", f"k={value}", "--meta", f"{value or 'v'}=v", "--json",
    )  # fmt: skip
    if "\x00" in value or value.startswith("[") or "=" in value:
        pass  # all accepted: a NUL, brackets and '=' are ordinary characters in a value
    assert submitted.code == 0, submitted.err
    assert submitted.data == {"request_id": request_id, "duplicate": False}
    inspected = cli(
        "queue", "inspect", "--topic", "build", "--id", f"{request_id}/request", "--json"
    )
    [message] = inspected.data
    payload = message["payload"]
    assert payload["request_id"] == request_id
    assert payload["metadata"]["k"] == value
    assert payload["head"] == [{"id": f"c{value}", "revision": value}]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (("submit", "--queue", "main", "--head", TEN_MB), "limit"),
        (("submit", "--queue", "main", "--head", "c", "--meta", f"k={TEN_MB}"), "limit"),
        (("submit", "--queue", "main", "--head", "c", "--request-id", TEN_MB), "1 to 191"),
        (("submit", "--queue", TEN_MB, "--head", "c"), "1 to 100"),
        (("queue", "publish", "--topic", "t", "--id", TEN_MB, "--partition", "p", "--payload", "{}"), "limit"),
        (("queue", "publish", "--topic", "t", "--id", "i", "--partition", TEN_MB, "--payload", "{}"), "limit"),
        (("queue", "publish", "--topic", TEN_MB, "--id", "i", "--partition", "p", "--payload", "{}"), "limit"),
        (("queue", "publish", "--topic", "t", "--id", "i", "--partition", "p", "--payload", f'"{TEN_MB}"'), "limit"),
        (("queue", "publish", "--topic", "t", "--id", "i", "--partition", "p", "--payload", "{}", "--metadata", f"k={TEN_MB}"), "larger than"),
        (("queue", "publish", "--topic", "t", "--id", "i", "--partition", "p", "--payload", "[" * 100_000), "nested"),
    ],
    ids=[
        "head", "meta", "request-id", "queue", "id", "partition", "topic", "payload",
        "metadata", "deep-json",
    ],
)  # fmt: skip
def test_oversize_values_are_refused_with_the_limit(
    cli: Cli, world: World, argv: tuple[str, ...], says: str
) -> None:
    before = table_counts(world)
    result = cli(*argv)
    assert result.refused_cleanly(), result.err[:500]
    assert says in result.err and len(result.err) < 1000, result.err[:500]
    assert table_counts(world) == before


def test_oversize_lookups_are_not_found(cli: Cli) -> None:
    for argv in (("builds", "show", TEN_MB), ("cancel", TEN_MB)):
        result = cli(*argv)
        assert result.refused_cleanly() and result.code == 1


@pytest.mark.parametrize(
    "argv",
    [
        ("submit", "--queue", "", "--head", "c"),
        ("submit", "--queue", "main", "--head", ""),
        ("submit", "--queue", "main", "--head", "@rev"),
        ("submit", "--queue", "main", "--head", "c", "--request-id", ""),
        ("submit", "--queue", "main", "--head", "c", "--meta", ""),
        ("submit", "--queue", "main", "--head", "c", "--meta", "=v"),
        ("submit", "--queue", "main", "--head", "c", "--base", ""),
        ("builds", "show", ""),
        ("cancel", ""),
        ("queue", "publish", "--topic", "t", "--id", "", "--partition", "p", "--payload", "{}"),
        ("queue", "publish", "--topic", "", "--id", "i", "--partition", "p", "--payload", "{}"),
        ("queue", "publish", "--topic", "t", "--id", "i", "--partition", "p", "--payload", ""),
        ("queue", "inspect", "--topic", "", "--id", ""),
    ],
)
def test_empty_strings_are_refused_clearly(cli: Cli, world: World, argv: tuple[str, ...]) -> None:
    before = table_counts(world)
    result = cli(*argv)
    assert result.refused_cleanly(), (result.code, result.err)
    assert table_counts(world) == before


NOT_UTF8 = "\udcff\udcfe"  # what Python makes of the bytes FF FE in argv


@pytest.mark.parametrize(
    "argv",
    [
        ("builds", "show", NOT_UTF8),
        ("cancel", NOT_UTF8),
        ("submit", "--queue", "main", "--head", "c", "--meta", f"k={NOT_UTF8}"),
        ("submit", "--queue", "main", "--head", NOT_UTF8),
        ("queue", "inspect", "--topic", "build", "--id", NOT_UTF8),
        ("queue", "messages", "--topic", NOT_UTF8),
        (
            "queue",
            "publish",
            "--topic",
            "t",
            "--id",
            "i",
            "--partition",
            NOT_UTF8,
            "--payload",
            "{}",
        ),
    ],
)
def test_arguments_that_are_not_utf8_are_refused(cli: Cli, argv: tuple[str, ...]) -> None:
    result = cli(*argv)
    assert result.refused_cleanly() and result.code == 2, result.err
    assert "not valid UTF-8" in result.err


def test_the_real_command_with_raw_bytes_and_hostile_values(backend_url: str) -> None:
    """As a process: argv bytes that are not UTF-8, and a SQL fragment, never a traceback."""
    for argv in (
        [b"builds", b"show", b"\xff\xfe"],
        [b"builds", b"show", b"'; DROP TABLE builds; --"],
        [b"submit", b"--queue", b"main", b"--head", b"c", b"--meta", b"k=\xc3"],
    ):
        done = subprocess.run(
            [BUILDQ.encode(), *argv, b"--url", backend_url.encode()],
            capture_output=True,
            timeout=60,
        )
        err = done.stderr.decode(errors="replace")
        assert done.returncode in (0, 1, 2) and "Traceback" not in err, err


# --- hostile names in the config, through a running daemon ------------------------------

QUEUE = "q'; DROP TABLE builds; -- ✓ [/]"
RUNNER = "r\"un'ner"


def test_hostile_queue_and_runner_names_in_the_config_are_plain_data(
    daemon: MakeDaemon, world: World, tmp_path: Path
) -> None:
    body = f"""
[runners.{_key(RUNNER)}]
type = "noop"

[queues.{_key(QUEUE)}]
runner = {_key(RUNNER)}

[queues.{_key(QUEUE)}.poll]
accepted_interval_s = 0.05
"""
    d = daemon(body).start()
    request_id = HOSTILE[0] + "#daemon"
    done = subprocess.run(
        [BUILDQ, "submit", "--config", str(d.config), "--queue", QUEUE, "--head", "c",
         "--request-id", request_id, "--meta", f"who={HOSTILE[2]}", "--wait", "--json",
         "--timeout", "60"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [row] = world.builds()
    assert (row.request_id, row.queue, row.runner, row.status) == (
        request_id,
        QUEUE,
        RUNNER,
        "SUCCEEDED",
    )
    wait_until(lambda: world.results_per_request() == {request_id: 1}, timeout=10)
    unknown = subprocess.run(
        [BUILDQ, "submit", "--config", str(d.config), "--queue", HOSTILE[1], "--head", "c"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert unknown.returncode == 2 and "unknown queue" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    assert d.stop() == 0


def _key(name: str) -> str:
    """A TOML quoted key."""
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


# --- messages the publisher refuses, and ids nobody knows ----------------------------------


@pytest.mark.parametrize(
    ("message", "says"),
    [
        (Message("m", b"x" * (4 * 1024 * 1024 + 1), "p"), "limit is"),
        (Message("m", b"{}", "p", {"k": "\udcff"}), "not valid Unicode"),
        (Message("m", b"{}", "p", {"\udcff": "v"}), "not valid Unicode"),
        (Message("m", b"{}", "p", {"k": "x" * 70_000}), "larger than"),
        (Message("m\udcff", b"{}", "p"), "not valid Unicode"),
        (Message("m", b"{}", "p\ud800"), "not valid Unicode"),
        (Message("", b"{}", "p"), "must not be empty"),
        (Message("m", "not bytes", "p"), "must be bytes"),  # type: ignore[arg-type]
        (Message("m", b"{}", "p", {"k": 1}), "strings"),  # type: ignore[dict-item]
    ],
    ids=[
        "oversize", "metadata-value", "metadata-key", "metadata-size", "id", "key", "empty-id",
        "str-payload", "int-metadata",
    ],
)  # fmt: skip
def test_the_publisher_refuses_what_it_cannot_store(
    db: Database, world: World, message: Message, says: str
) -> None:
    before = table_counts(world)
    with pytest.raises(InvalidMessage) as refused:
        SqlQueue(db).publish(topics.BUILD, message)
    assert says in str(refused.value)
    assert table_counts(world) == before


def test_unknown_build_ids_are_not_found(cli: Cli, db: Database) -> None:
    store_build(db, 1, "known")
    for argv in (
        ("builds", "show", "sim-1-1-1-p-0000000000000000"),
        ("cancel", "never-stored"),
        ("queue", "inspect", "--topic", topics.BUILDSIGNAL, "--id", "never-stored/poll/1"),
    ):
        result = cli(*argv)
        assert result.refused_cleanly() and result.code == 1, (argv, result)
