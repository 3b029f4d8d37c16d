"""What ``builds ls`` and ``db upgrade`` print for a human (issue 15, item 9)."""

from __future__ import annotations

from buildq.buildrunner import Change
from buildq.migrations import head_revision
from buildq.orchestrator.model import BuildRequest
from buildq.orchestrator.sqlbatch import SqlBuildBatch
from buildq.storage.database import Database
from tests.support.cli import run_cli

LONG_BUILD = "gh:a-rather-long-organisation/and-its-repository-name/12345678901/1"
LONG_REQUEST = "merge-queue/main/batch-2026-11-30T01:02:03Z-7f3a9c"


def _trigger(db: Database, request_id: str, build_id: str) -> None:
    request = BuildRequest(request_id, "main", (), (Change("c1", "r1"),))
    db.write(
        lambda conn: SqlBuildBatch(conn, 1_000, immediate=True).insert_triggered(
            request, build_id, "gha"
        )
    )


def test_columns_fit_the_longest_ids(cli, db: Database) -> None:
    _trigger(db, LONG_REQUEST, LONG_BUILD)
    _trigger(db, "req-2", "bk:acme/app/7")

    result = cli("builds", "ls")

    assert result.code == 0, result.err
    header, *rows = result.out.splitlines()
    assert len(rows) == 2
    request_at, queue_at = header.index("REQUEST"), header.index("QUEUE")
    for row, (build_id, request_id) in zip(
        sorted(rows), sorted([(LONG_BUILD, LONG_REQUEST), ("bk:acme/app/7", "req-2")]), strict=True
    ):
        assert row.startswith(build_id + " ")
        assert row[request_at:].startswith(request_id + " ")
        assert row[queue_at:].startswith("main ")


def test_no_builds_says_so(cli) -> None:
    result = cli("builds", "ls")
    assert result.code == 0 and result.out == "no builds\n"


def test_db_upgrade_prints_the_revision_id(tmp_path, capsys) -> None:
    url = f"sqlite:///{tmp_path / 'new' / 'buildq.db'}"
    first = run_cli(["db", "upgrade", "--url", url, "--revision", "0002"], capsys)
    assert first.code == 0 and first.out.endswith("is at revision 0002\n"), first
    latest = run_cli(["db", "upgrade", "--url", url], capsys)
    assert latest.code == 0, latest
    assert latest.out.endswith(f"is at revision {head_revision()} (the latest)\n")
