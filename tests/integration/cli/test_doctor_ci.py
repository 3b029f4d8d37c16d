"""``buildq doctor`` asks the CI services (issue 15, items 3 and 7): whether the token sees the
pipeline, workflow, project or job, and whether a CI setting cancels buildq's builds against
each other. Each kind asks through its doctor hook (``RunnerKind.doctor``); Buildbot's, against
a real master, is in test_doctor_buildbot.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from buildq.buildrunner import RunnerUnauthorized, TransientRunnerError
from buildq.buildrunner._siblings import branch_matches, concurrency_settings, github_warnings
from buildq.buildrunner.registry import DoctorRow, RunnerKind
from buildq.cli import doctor_ci
from buildq.migrations import upgrade
from tests.support.cli import CliResult, run_cli
from tests.support.fakeci import FakeBuildkite, FakeGitHub
from tests.support.fakeci._server import FakeService
from tests.support.fakeci.gitlab import FakeGitLab
from tests.support.fakeci.jenkins import DISABLE_CONCURRENT, FakeJenkins

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


FakeT = TypeVar("FakeT", bound=FakeService)


def _serving(fake_class: type[FakeT], monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeT]:
    """A fake CI service whose token the runner under test reads from the environment."""
    with fake_class() as fake:
        monkeypatch.setenv(TOKEN_ENV, fake.token)
        yield fake


@pytest.fixture
def bk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBuildkite]:
    yield from _serving(FakeBuildkite, monkeypatch)


@pytest.fixture
def gh(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitHub]:
    yield from _serving(FakeGitHub, monkeypatch)


@pytest.fixture
def gl(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeGitLab]:
    yield from _serving(FakeGitLab, monkeypatch)


@pytest.fixture
def jk(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeJenkins]:
    yield from _serving(FakeJenkins, monkeypatch)


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


def _gl_table(fake: FakeGitLab, ref: str = "main", project: str | None = None) -> str:
    return (
        f'[runners.gl]\ntype = "gitlab"\napi_url = "{fake.url}/api/v4"\n'
        f'project = "{project or fake.project_path}"\nref = "{ref}"\ntoken_env = "{TOKEN_ENV}"\n'
        "retry_backoff_s = 0.01\n"
    )


def _jk_table(fake: FakeJenkins) -> str:
    return (
        f'[runners.jk]\ntype = "jenkins"\napi_url = "{fake.url}"\njob = "{fake.job}"\n'
        f'user = "{fake.user}"\ntoken_env = "{TOKEN_ENV}"\nretry_backoff_s = 0.01\n'
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


def test_gitlab_auto_cancel_redundant_pipelines_is_a_warning(
    gl: FakeGitLab, tmp_path: Path, capsys
) -> None:
    _, checks = _doctor(tmp_path, _gl_table(gl), capsys)
    assert checks["runner gl api"] == {
        "name": "runner gl api",
        "status": "ok",
        "detail": "the token can see project acme/app",
        "fix": "",
    }
    assert "runner gl siblings" not in checks  # "disabled": nothing cancels buildq's pipelines
    assert gl.request_count("GET", "/api/v4/projects/acme%2Fapp") == 1

    gl.auto_cancel_pending_pipelines = "enabled"
    result, checks = _doctor(tmp_path, _gl_table(gl, ref="merge-queue"), capsys)
    warning = checks["runner gl siblings"]
    assert warning["status"] == "WARN"
    assert "Auto-cancel redundant pipelines is on" in warning["detail"]
    assert "'merge-queue'" in warning["detail"] and "interruptible" in warning["detail"]
    assert "Settings > CI/CD > General pipelines" in warning["fix"]
    assert "workflow:auto_cancel:on_new_commit: none" in warning["fix"]
    assert result.code == 0 and result.data["ok"] is True
    assert gl.token not in result.out


def test_gitlab_settings_hidden_from_a_developer_token_are_skipped(
    gl: FakeGitLab, tmp_path: Path, capsys
) -> None:
    gl.auto_cancel_pending_pipelines = "enabled"
    gl.maintainer = False  # GitLab shows CI/CD settings to a Maintainer only
    result, checks = _doctor(tmp_path, _gl_table(gl), capsys)
    assert checks["runner gl api"]["status"] == "ok"
    skipped = checks["runner gl siblings"]
    assert skipped["status"] == "skip" and "Maintainer" in skipped["detail"]
    assert result.code == 0


def test_gitlab_refused_token_and_unknown_project_fail(
    gl: FakeGitLab, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "glpat-wrong")
    result, checks = _doctor(tmp_path, _gl_table(gl), capsys)
    api = checks["runner gl api"]
    assert result.code == 1 and api["status"] == "FAIL"
    assert api["detail"].startswith("GitLab answered 401") and "permissions" in api["fix"]
    assert "runner gl siblings" not in checks

    monkeypatch.setenv(TOKEN_ENV, gl.token)
    result, checks = _doctor(tmp_path, _gl_table(gl, project="acme/gone"), capsys)
    api = checks["runner gl api"]
    assert result.code == 1 and api["status"] == "FAIL" and "404" in api["detail"]
    assert api["fix"] == "check the runner's table against the CI service"


def test_jenkins_abort_previous_is_a_warning(jk: FakeJenkins, tmp_path: Path, capsys) -> None:
    _, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    assert checks["runner jk api"]["status"] == "ok"
    assert checks["runner jk api"]["detail"] == "the token can see job folder/app-merge"
    assert "runner jk siblings" not in checks

    jk.disable_concurrent_builds(abort_previous=False)  # builds wait their turn: fine
    _, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    assert "runner jk siblings" not in checks

    jk.disable_concurrent_builds(abort_previous=True)
    result, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    warning = checks["runner jk siblings"]
    assert warning["status"] == "WARN"
    assert "abortPrevious: true" in warning["detail"] and "NOT_BUILT" in warning["detail"]
    assert warning["fix"].startswith("drop abortPrevious")
    assert result.code == 0 and jk.token not in result.out


def test_jenkins_job_json_without_concurrent_build_is_skipped(
    jk: FakeJenkins, tmp_path: Path, capsys
) -> None:
    jk.job_properties = [{"_class": DISABLE_CONCURRENT}]
    jk.concurrent_build = None
    _, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    skipped = checks["runner jk siblings"]
    assert skipped["status"] == "skip" and "not checked" in skipped["detail"]

    jk.job_properties = None  # no property list at all: nothing to tell from
    _, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    assert checks["runner jk siblings"]["status"] == "skip"


def test_jenkins_refused_token_fails(
    jk: FakeJenkins, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    jk.deny(403, "Forbidden")  # a user without Item/Read on the job
    result, checks = _doctor(tmp_path, _jk_table(jk), capsys)
    api = checks["runner jk api"]
    assert result.code == 1 and api["status"] == "FAIL"
    assert api["detail"].startswith("Jenkins answered 403")
    assert jk.token not in result.out


def _kind(hook: Any) -> RunnerKind:
    return RunnerKind("mycity", lambda table: None, lambda n, c: None, doctor=hook, source="x 1")


def test_inspect_runs_any_kinds_hook_and_turns_its_errors_into_fail_rows() -> None:
    rows = [DoctorRow("runner m ping", "ok", "pong")]
    assert doctor_ci.inspect("m", _kind(lambda name, config: rows), None) == rows
    assert doctor_ci.inspect("m", RunnerKind("k", lambda t: None, lambda n, c: None), None) == []

    def refused(name: str, config: object) -> list[DoctorRow]:
        raise RunnerUnauthorized("MyCity answered 403", "MyCity answered 403: check the token")

    def unreachable(name: str, config: object) -> list[DoctorRow]:
        raise TransientRunnerError("connect failed")

    def broken(name: str, config: object) -> list[DoctorRow]:
        raise KeyError("oops")

    [row] = doctor_ci.inspect("m", _kind(refused), None)
    assert row == DoctorRow(
        "runner m api",
        "FAIL",
        "MyCity answered 403: check the token",
        "give the runner a token with the permissions in docs/ci-runners.md",
    )
    [row] = doctor_ci.inspect("m", _kind(unreachable), None)  # a config without http.api_url
    assert row.status == "FAIL" and row.detail == "cannot reach the CI service: connect failed"
    [row] = doctor_ci.inspect("m", _kind(broken), None)
    assert row.status == "FAIL" and "KeyError" in row.detail and row.fix == "report it to x 1"
