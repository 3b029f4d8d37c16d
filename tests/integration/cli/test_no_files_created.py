"""Commands pointed at a SQLite file that does not exist create nothing (issue 15, item 6).

Only ``buildq db upgrade`` creates a database. A typo'd path used to leave an empty database
(and its directories) behind, which the next command then found "unmigrated".
"""

from __future__ import annotations

from pathlib import Path

import pytest

from buildq.storage.database import create_engine
from buildq.storage.errors import DatabaseMissing
from tests.support.cli import run_cli

COMMANDS = [
    ["builds", "ls"],
    ["builds", "show", "req-1"],
    ["watch", "--once"],
    ["cancel", "req-1"],
    ["submit", "--queue", "main", "--head", "c1"],
    ["queue", "topics"],
    ["queue", "stats", "--topic", "build"],
    ["queue", "leases"],
    ["queue", "messages", "--topic", "build"],
    ["dlq", "ls", "--topic", "build"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=lambda argv: " ".join(argv[:2]))
def test_a_command_on_a_missing_file_says_so_and_creates_nothing(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing" / "x.db"
    result = run_cli([*argv, "--url", f"sqlite:///{missing}"], capsys)
    assert result.refused_cleanly() and result.code == 1, result
    assert f"database file {missing} does not exist" in result.err
    assert "buildq db upgrade --url" in result.err
    assert not missing.parent.exists()


def test_with_a_config_the_fix_names_the_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "state" / "buildq.db"
    config = tmp_path / "buildq.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{missing}"\n')
    result = run_cli(["queue", "topics", "--config", str(config)], capsys)
    assert result.refused_cleanly(), result
    assert f"run 'buildq db upgrade --config {config}' to create it" in result.err
    assert not missing.parent.exists()


def test_only_an_engine_made_to_create_creates(tmp_path: Path) -> None:
    path = tmp_path / "new" / "buildq.db"
    with pytest.raises(DatabaseMissing):
        create_engine(f"sqlite:///{path}")
    assert not path.parent.exists()
    engine = create_engine(f"sqlite:///{path}", create=True)
    with engine.connect():
        pass
    engine.dispose()
    assert path.is_file()


def test_a_file_deleted_after_the_engine_was_made_is_not_recreated(tmp_path: Path) -> None:
    path = tmp_path / "buildq.db"
    creator = create_engine(f"sqlite:///{path}", create=True)
    creator.connect().close()
    creator.dispose()
    engine = create_engine(f"sqlite:///{path}")
    path.unlink()
    with pytest.raises(Exception, match="unable to open database file"):
        engine.connect()
    engine.dispose()
    assert not path.exists()
