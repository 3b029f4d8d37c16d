"""Which config file a command reads when the operator does not say (issue 15, item 2).

--config, else $BUILDQ_CONFIG, else ./config/buildq.toml, else /etc/buildq/buildq.toml; with
none of them, one line that says so and lists where it looked.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from buildq.cli.common import SYSTEM_CONFIG, CliError, find_config
from buildq.migrations import upgrade
from tests.support.cli import run_cli


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A working directory with no config, and no config in the environment."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("BUILDQ_CONFIG", raising=False)
    monkeypatch.delenv("BUILDQ_DATABASE__URL", raising=False)
    return cwd


def _config(path: Path, db: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[database]\nurl = "sqlite:///{db}"\n')
    upgrade(f"sqlite:///{db}")
    return path


def test_no_config_anywhere_says_so_and_lists_where_it_looked(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if Path(SYSTEM_CONFIG).exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists on this machine: the command would read it")
    for argv in (["queue", "topics"], ["builds", "ls"], ["run"], ["db", "upgrade"]):
        result = run_cli(argv, capsys)
        assert result.refused_cleanly(), result
        assert "no config file found" in result.err
        for place in ("--config", "$BUILDQ_CONFIG", str(elsewhere / "config/buildq.toml")):
            assert place in result.err
        assert SYSTEM_CONFIG in result.err
        assert not (elsewhere / "var").exists()


def test_buildq_config_is_read_from_any_directory(
    elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    config = _config(tmp_path / "etc" / "buildq.toml", tmp_path / "state" / "buildq.db")
    monkeypatch.setenv("BUILDQ_CONFIG", str(config))
    result = run_cli(["queue", "topics", "--json"], capsys)
    assert result.code == 0 and result.data == [], result


def test_the_search_order(tmp_path: Path) -> None:
    local = tmp_path / "cwd" / "config" / "buildq.toml"
    system = tmp_path / "etc" / "buildq" / "buildq.toml"
    for path in (local, system):
        path.parent.mkdir(parents=True)
        path.write_text("")
    env = {"BUILDQ_CONFIG": "/from/env.toml"}
    cwd = tmp_path / "cwd"
    assert find_config("/given.toml", env, cwd, system) == Path("/given.toml")
    assert find_config(None, env, cwd, system) == Path("/from/env.toml")
    assert find_config(None, {}, cwd, system) == local
    assert find_config(None, {}, tmp_path, system) == system  # no ./config here
    system.unlink()
    with pytest.raises(CliError, match="no config file found"):
        find_config(None, {}, tmp_path, system)
    # Defaults plus environment, as before, when the environment names the database.
    assert find_config(None, {"BUILDQ_DATABASE__URL": "sqlite:///x"}, tmp_path, system) is None


def test_a_given_config_that_does_not_exist_is_not_replaced_by_another(
    elsewhere: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _config(elsewhere / "config" / "buildq.toml", tmp_path / "buildq.db")
    monkeypatch.setenv("BUILDQ_CONFIG", str(tmp_path / "typo.toml"))
    result = run_cli(["queue", "topics"], capsys)
    assert result.refused_cleanly() and "typo.toml" in result.err, result


def test_doctor_fails_the_config_check_with_the_same_message(
    elsewhere: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if Path(SYSTEM_CONFIG).exists():
        pytest.skip(f"{SYSTEM_CONFIG} exists on this machine: doctor would read it")
    result = run_cli(["doctor", "--json"], capsys)
    config = {check["name"]: check for check in result.data["checks"]}["config"]
    assert result.code == 1 and config["status"] == "FAIL"
    assert "no config file found" in config["detail"]
