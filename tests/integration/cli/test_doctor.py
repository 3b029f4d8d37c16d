"""``buildq doctor``: every check passing, and each failure naming its fix."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tests.integration.cli.conftest import Result

SECRET = "s3cr3t-token-value"


def _config(tmp_path: Path, url: str, runners: str = "") -> Path:
    path = tmp_path / "buildq.toml"
    path.write_text(f'[database]\nurl = "{url}"\n\n{runners}')
    return path


RUNNERS = """
[runners.fast]
type = "noop"

[runners.gh]
type = "github"
owner = "acme"
repo = "app"
workflow = "ci.yml"
token_env = "BUILDQ_TEST_GH_TOKEN"
"""


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("BUILDQ_TEST_GH_TOKEN", SECRET)
    monkeypatch.delenv("BUILDQ_CONFIG", raising=False)


def _checks(result: Result) -> dict[str, dict]:
    return {check["name"]: check for check in result.data["checks"]}


def test_everything_ok_on_a_migrated_database(cli, backend_url, tmp_path):
    config = _config(tmp_path, backend_url, RUNNERS)

    result = cli("doctor", "--config", str(config), "--json", "--offline", url=False)
    text = cli("doctor", "--config", str(config), "--offline", url=False)

    checks = _checks(result)
    assert result.data["ok"] is True
    assert {name: c["status"] for name, c in checks.items()} == {
        "config": "ok",
        "database": "ok",
        "server": "ok",
        "schema": "ok",
        "runner fast": "ok",
        "runner gh": "ok",
        **({"sqlite wal": "ok"} if backend_url.startswith("sqlite") else {}),
    }
    assert checks["server"]["detail"].split()[0] in ("SQLite", "MariaDB", "MySQL")
    assert text.code == 0 and text.out.rstrip().endswith("all checks passed")
    assert SECRET not in result.out + text.out


def test_with_url_only_the_database_is_checked(cli):
    result = cli("doctor", "--json")
    checks = _checks(result)
    assert result.data["ok"] is True and result.code == 0, result.out
    assert checks["config"]["status"] == "skip" and checks["runners"]["status"] == "skip"
    assert checks["schema"]["status"] == "ok"


def test_an_unmigrated_database_fails_with_the_upgrade_command(cli, tmp_path):
    db_file = tmp_path / "empty.db"
    sqlite3.connect(db_file).close()
    config = _config(tmp_path, f"sqlite:///{db_file}")

    result = cli("doctor", "--config", str(config), url=False)

    assert result.code == 1
    assert "FAIL  schema" in result.out
    assert f"fix: run 'buildq db upgrade --config {config}'" in result.out


def test_a_missing_sqlite_file_is_not_created(cli, tmp_path):
    missing = tmp_path / "nothing.db"
    result = cli("doctor", "--url", f"sqlite:///{missing}", "--json", url=False)
    assert result.code == 1 and not missing.exists()
    assert "does not exist" in _checks(result)["database"]["detail"]


def test_an_unreachable_server_fails_in_one_line(cli):
    url = "mysql+pymysql://buildq:pw@127.0.0.1:1/buildq"
    result = cli("doctor", "--url", url, url=False)
    assert result.code == 1
    assert "FAIL  database  mysql+pymysql://buildq:***@127.0.0.1:1/buildq" in result.out
    assert ":pw@" not in result.out and "Traceback" not in result.err


def test_a_runner_whose_secret_does_not_resolve_names_the_key(
    cli, backend_url, tmp_path, monkeypatch
):
    monkeypatch.delenv("BUILDQ_TEST_GH_TOKEN")
    config = _config(tmp_path, backend_url, RUNNERS)

    result = cli("doctor", "--config", str(config), "--json", url=False)

    gh = _checks(result)["runner gh"]
    assert result.code == 1 and gh["status"] == "FAIL"
    assert "runners.gh.token_env" in gh["fix"]
    assert _checks(result)["runner fast"]["status"] == "ok"


def test_a_bad_config_is_the_fix(cli, tmp_path):
    config = _config(tmp_path, "sqlite:///x.db", '[runners.x]\ntype = "nope"\n')
    result = cli("doctor", "--config", str(config), "--json", url=False)
    check = _checks(result)["config"]
    assert result.code == 1 and check["status"] == "FAIL"
    assert check["fix"].startswith("config runners.x.type = 'nope': expected one of noop")
    assert _checks(result)["database"]["status"] == "skip"
