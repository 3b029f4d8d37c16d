"""``buildq setup-host`` renders the shipped templates for this host (issue 15, item 5)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from buildq.cli.host import Host, render_config, render_unit
from buildq.config import load_config
from tests.support.cli import run_cli


def _argv(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "setup-host",
        "--config-dir",
        str(tmp_path / "etc"),
        "--unit-dir",
        str(tmp_path / "units"),
        "--state-dir",
        str(tmp_path / "state"),
        *extra,
    ]


def test_writes_a_config_and_unit_for_this_installation(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = run_cli(_argv(tmp_path), capsys)
    assert result.code == 0, result
    config, unit = tmp_path / "etc" / "buildq.toml", tmp_path / "units" / "buildq.service"
    assert f"wrote {config}" in result.out and f"wrote {unit}" in result.out
    assert "db upgrade --config" in result.out  # the next steps
    loaded = load_config(config)
    assert loaded.database.url == f"sqlite:///{tmp_path / 'state' / 'buildq.db'}"
    text = unit.read_text()
    assert f"ExecStart={Path(sys.executable).with_name('buildq')} run" in text
    assert f"Environment=BUILDQ_CONFIG={config}" in text
    assert f"WorkingDirectory={tmp_path / 'state'}" in text
    assert f"ReadWritePaths={tmp_path / 'state'}" in text and "StateDirectory=buildq" not in text
    assert (tmp_path / "state").is_dir()


def test_a_state_directory_under_var_lib_is_systemds_to_create() -> None:
    host = Host(Path("/etc/bq"), Path("/u"), Path("/var/lib/bq"), Path("/opt/bq/bin/buildq"), None)
    text = render_unit(host)
    assert "StateDirectory=bq\n" in text and "ReadWritePaths" not in text
    assert 'url = "sqlite:////var/lib/bq/buildq.db"' in render_config(host)


def test_existing_files_are_kept_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_cli(_argv(tmp_path), capsys).code == 0
    assert run_cli(_argv(tmp_path), capsys).code == 0  # the same content: nothing to keep
    config = tmp_path / "etc" / "buildq.toml"
    config.write_text(config.read_text() + "\n[queues.edited]\nrunner = 'ci'\n")
    refused = run_cli(_argv(tmp_path), capsys)
    assert refused.refused_cleanly() and "--force" in refused.err
    assert "[queues.edited]" in config.read_text()
    # An upgrade rewrites the unit alone; the edited config stays.
    unit = tmp_path / "units" / "buildq.service"
    unit.write_text("[Service]\nExecStart=/old/buildq run\n")
    assert run_cli(_argv(tmp_path, "--only", "unit", "--force"), capsys).code == 0
    assert "[queues.edited]" in config.read_text() and "/old/buildq" not in unit.read_text()
    assert run_cli(_argv(tmp_path, "--force"), capsys).code == 0
    assert "[queues.edited]" not in config.read_text()


def test_a_database_url_and_its_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "mysql+pymysql://buildq@db.internal:3306/buildq"
    printed = run_cli(_argv(tmp_path, "--database-url", url, "--only", "config", "--print"), capsys)
    assert printed.code == 0 and f'\nurl = "{url}"' in printed.out
    assert '\npassword_env = "BUILDQ_DB_PASSWORD"' in printed.out
    assert not (tmp_path / "etc").exists()  # --print writes nothing
    secret = run_cli(_argv(tmp_path, "--database-url", "mysql+pymysql://u:s3cret@db/x"), capsys)
    assert secret.refused_cleanly() and "s3cret" not in secret.err
