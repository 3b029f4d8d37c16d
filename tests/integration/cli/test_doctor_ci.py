"""``buildq doctor`` asks the CI services (issue 15, items 3 and 7): whether the token sees the
pipeline or workflow, and whether a CI setting cancels buildq's builds against each other."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from buildq.buildrunner._siblings import branch_matches, concurrency_settings, github_warnings
from buildq.migrations import upgrade
from tests.support.cli import CliResult, run_cli
from tests.support.fakeci import FakeBuildkite, FakeGitHub

TOKEN_ENV = "BUILDQ_TEST_DOCTOR_TOKEN"

SHARED_GROUP = """\
name: buildq
run-name: "buildq ${{ inputs.buildq_request_id }}"
on:
  workflow_dispatch:
    inputs:
      buildq_request_id: { description: id, required: true, type: string }
concurrency:
  group: ${{ github.workflow }}-${{ github.ref }}
  cancel-in-progress: true
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: make test
"""
PER_BUILD = SHARED_GROUP.replace(
    "${{ github.workflow }}-${{ github.ref }}", "buildq-${{ inputs.buildq_request_id }}"
)


@pytest.fixture
def bk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBuildkite]:
    with FakeBuildkite() as fake:
        monkeypatch.setenv(TOKEN_ENV, fake.token)
        yield fake


@pytest.fixture
def gh(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        monkeypatch.setenv(TOKEN_ENV, fake.token)
        yield fake


def _doctor(tmp_path: Path, runner: str, capsys, *extra: str) -> tuple[CliResult, dict[str, dict]]:
    config = tmp_path / "buildq.toml"
    url = f"sqlite:///{tmp_path / 'x.db'}"
    if not (tmp_path / "x.db").exists():
        upgrade(url)
    config.write_text(f'[database]\nurl = "{url}"\n\n{runner}')
    result = run_cli(["doctor", "--config", str(config), "--json", *extra], capsys)
    return result, {c["name"]: c for c in result.data["checks"]}


def _bk_table(fake: FakeBuildkite) -> str:
    return (
        f'[runners.bk]\ntype = "buildkite"\napi_url = "{fake.url}"\norganization = '
        f'"{fake.organization}"\npipeline = "{fake.pipeline}"\ntoken_env = "{TOKEN_ENV}"\n'
        "retry_backoff_s = 0.01\n"
    )


def _gh_table(fake: FakeGitHub) -> str:
    return (
        f'[runners.gh]\ntype = "github"\napi_url = "{fake.url}"\nowner = "{fake.owner}"\n'
        f'repo = "{fake.repo}"\nworkflow = "{fake.workflow}"\ntoken_env = "{TOKEN_ENV}"\n'
        "retry_backoff_s = 0.01\n"
    )


def test_buildkite_cancel_intermediate_builds_on_the_branch_is_a_warning(
    bk: FakeBuildkite, tmp_path: Path, capsys
) -> None:
    bk.pipeline_settings["cancel_running_branch_builds"] = True
    result, checks = _doctor(tmp_path, _bk_table(bk), capsys)
    assert checks["runner bk api"]["status"] == "ok"
    warning = checks["runner bk siblings"]
    assert warning["status"] == "WARN" and "Cancel Intermediate Builds" in warning["detail"]
    assert "'!main'" in warning["fix"]
    assert result.code == 0 and result.data["ok"] is True  # a warning fails nothing
    assert bk.token not in result.out

    bk.pipeline_settings["cancel_running_branch_builds_filter"] = "!main"
    bk.pipeline_settings["skip_queued_branch_builds"] = True
    bk.pipeline_settings["skip_queued_branch_builds_filter"] = "main release/*"
    _, checks = _doctor(tmp_path, _bk_table(bk), capsys)
    assert "Skip Intermediate Builds" in checks["runner bk siblings"]["detail"]


def test_github_shared_concurrency_group_is_a_warning_a_per_build_one_is_not(
    gh: FakeGitHub, tmp_path: Path, capsys
) -> None:
    gh.workflow_file = SHARED_GROUP
    _, checks = _doctor(tmp_path, _gh_table(gh), capsys)
    warning = checks["runner gh siblings"]
    assert warning["status"] == "WARN" and "cancel-in-progress: true" in warning["detail"]
    assert "inputs.buildq_request_id" in warning["fix"]

    gh.workflow_file = PER_BUILD
    _, checks = _doctor(tmp_path, _gh_table(gh), capsys)
    assert checks["runner gh api"]["status"] == "ok" and "runner gh siblings" not in checks

    gh.workflow_file = None  # the token may not read contents
    _, checks = _doctor(tmp_path, _gh_table(gh), capsys)
    assert checks["runner gh siblings"]["status"] == "skip"
    assert "Contents: read" in checks["runner gh siblings"]["detail"]


def test_a_refused_token_fails_the_api_check(gh: FakeGitHub, tmp_path: Path, capsys) -> None:
    gh.deny(401, "Bad credentials")
    result, checks = _doctor(tmp_path, _gh_table(gh), capsys)
    api = checks["runner gh api"]
    assert result.code == 1 and api["status"] == "FAIL"
    assert api["detail"].startswith("GitHub answered 401 (Bad credentials)")
    assert gh.token not in result.out


def test_offline_asks_nothing(gh: FakeGitHub, tmp_path: Path, capsys) -> None:
    _, checks = _doctor(tmp_path, _gh_table(gh), capsys, "--offline")
    assert "runner gh api" not in checks and gh.requests == []


def test_concurrency_settings_in_their_documented_forms() -> None:
    workflow = """\
on: workflow_dispatch
concurrency: ci-${{ github.ref }}   # the scalar form
jobs:
    build:
        concurrency:
            group: 'deploy'
            cancel-in-progress: ${{ github.ref != 'refs/heads/main' }}
    mine:
        concurrency: buildq-${{ github.run_id }}
"""
    settings = concurrency_settings(workflow)
    assert [(c.where, c.group, c.cancel_in_progress) for c in settings] == [
        ("workflow", "ci-${{ github.ref }}", "false"),
        ("job 'build'", "deploy", "${{ github.ref != 'refs/heads/main' }}"),
        ("job 'mine'", "buildq-${{ github.run_id }}", "false"),
    ]
    assert len(github_warnings(workflow)) == 2  # the run id makes the last one unique


@pytest.mark.parametrize(
    ("branch_filter", "matches"),
    [
        (None, True),
        ("", True),
        ("main", True),
        ("!main", False),
        ("feature/*", False),
        ("* !main", False),
        ("!dev", True),
    ],
)
def test_buildkite_branch_filters(branch_filter: str | None, matches: bool) -> None:
    assert branch_matches(branch_filter, "main") is matches
