"""``buildq doctor`` against a real Buildbot master (the session's, shared with the runner
tests): the builder and the force scheduler buildq triggers through must exist, name each
other, and take buildq's properties. Slow, like the rest of Buildbot's tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from buildq.buildrunner import buildbot as bb
from buildq.migrations import upgrade
from tests.support.buildbot import BuildbotMaster
from tests.support.cli import CliResult, run_cli

pytestmark = pytest.mark.slow


def _doctor(
    tmp_path: Path, master: BuildbotMaster, capsys: Any, **keys: str
) -> tuple[CliResult, list[dict[str, str]]]:
    url = f"sqlite:///{tmp_path / 'x.db'}"
    if not (tmp_path / "x.db").exists():
        upgrade(url)
    table = "".join(f'{key} = "{value}"\n' for key, value in keys.items())
    config = tmp_path / "buildq.toml"
    config.write_text(
        f'[database]\nurl = "{url}"\n\n[runners.bb]\ntype = "buildbot"\n'
        f'api_url = "{master.url}"\n{table}'
    )
    result = run_cli(["doctor", "--config", str(config), "--json"], capsys)
    return result, [c for c in result.data["checks"] if c["name"] == "runner bb api"]


def test_the_builder_and_its_force_scheduler_pass(
    buildbot: BuildbotMaster, tmp_path: Path, capsys: Any
) -> None:
    result, [row] = _doctor(tmp_path, buildbot, capsys, builder="buildq")
    assert row["status"] == "ok", row
    assert row["detail"] == "the master has builder buildq and force scheduler buildq"
    assert result.code == 0


def test_a_missing_builder_or_scheduler_fails_with_the_fix(
    buildbot: BuildbotMaster, tmp_path: Path, capsys: Any
) -> None:
    result, rows = _doctor(tmp_path, buildbot, capsys, builder="app-merge")
    assert result.code == 1
    assert [(r["status"], r["detail"]) for r in rows] == [
        ("FAIL", "the master has no builder 'app-merge'"),
        ("FAIL", "force scheduler 'buildq' cannot start builder 'app-merge'"),
    ]
    assert rows[1]["fix"] == "add 'app-merge' to its builderNames"

    result, [row] = _doctor(tmp_path, buildbot, capsys, builder="buildq", scheduler="merge")
    assert result.code == 1 and row["status"] == "FAIL"
    assert row["detail"] == "the master has no force scheduler 'merge'"
    assert "ForceScheduler named 'merge'" in row["fix"]


def test_undeclared_properties_and_a_disabled_scheduler_are_problems(
    bb_runner: bb.BuildbotRunner,
) -> None:
    """The master's own answers, edited: its config declares every property and enables the
    scheduler, and a second master just for this would be slow."""
    builder, scheduler = bb_runner.doctor_view()
    assert builder is not None and builder["masterids"] and scheduler is not None
    config = bb_runner.config
    assert list(bb._problems(config, builder, scheduler)) == []

    fields = [f for f in scheduler["all_fields"] if f.get("fullName") != "buildq_base"]
    edited = {**scheduler, "all_fields": fields, "enabled": False}
    details = [detail for detail, _ in bb._problems(config, {**builder, "masterids": []}, edited)]
    assert details == [
        "builder 'buildq' runs on no master",
        "force scheduler 'buildq' is disabled",
        "force scheduler 'buildq' does not declare buildq_base: Buildbot would leave it out of "
        "buildq's builds",
    ]
