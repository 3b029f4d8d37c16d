"""GitHubRunner against the fake GitHub: dispatch, run lookup, attempts, mapping, cancel."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from buildq.buildrunner._http_runner import mentions_token
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerError,
    TransientRunnerError,
)
from buildq.buildrunner.github import GitHubRunner
from tests.support.fakeci import FakeGitHub, FakeRun, Fault

BASE = [Change("base-1", "aaa")]
HEAD = [Change("head-1", "bbb", {"title": "feat"}), Change("head-2", "ccc")]


def trigger(runner: GitHubRunner, request_id: str | None = "req-1") -> BuildID:
    metadata = {CORRELATION_KEY: request_id} if request_id else {}
    return runner.trigger("main", BASE, HEAD, metadata)


def run_id_of(build_id: BuildID) -> int:
    return int(build_id.id.split("/")[2])


def test_dispatch_with_run_details(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    build_id = trigger(gh_runner)

    [run] = gh.dispatched_runs()
    assert build_id == BuildID(f"gh:octo/app/{run.id}/1")
    assert run.inputs[CORRELATION_KEY] == "req-1"
    assert run.inputs["queue"] == "main"
    assert json.loads(run.inputs["base"]) == [{"id": "base-1", "revision": "aaa", "extra": {}}]
    assert [c["id"] for c in json.loads(run.inputs["head"])] == ["head-1", "head-2"]
    assert run.display_title == "buildq req-1"
    [dispatch] = gh.requests_matching("POST", "/dispatches")
    assert dispatch.body["return_run_details"] is True
    assert dispatch.body["ref"] == "main"


def test_204_dispatch_finds_the_run_by_token_not_the_newest(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    gh.add_run("buildq req-10")  # an older run whose token merely starts like ours
    gh.dispatch_without_run_id()
    gh.list_lag = 2  # our run shows up in listings only on the third look

    def someone_else_dispatches(_ours: FakeRun) -> None:
        gh.add_run("buildq req-1x")  # right after ours: the newest run in every listing

    gh.after_dispatch = someone_else_dispatches
    build_id = trigger(gh_runner)

    ours = next(r for r in gh.runs() if r.inputs)
    assert build_id == BuildID(f"gh:octo/app/{ours.id}/1")
    assert max(r.id for r in gh.runs()) != ours.id
    listings = gh.requests_matching("GET", "/workflows/buildq.yml/runs")
    assert all(r.param("event") == "workflow_dispatch" for r in listings)
    assert all((r.param("created") or "").startswith(">=") for r in listings)


def test_server_without_run_details_field_falls_back_once(
    make_gh_runner: Callable[..., GitHubRunner],
) -> None:
    with FakeGitHub(run_details="unsupported") as legacy:
        runner = make_gh_runner(api_url=legacy.url)
        first = trigger(runner, "req-a")
        second = trigger(runner, "req-b")
        statuses = [
            (r.status, "return_run_details" in r.body) for r in legacy.requests_matching("POST")
        ]
    assert statuses == [(400, True), (204, False), (204, False)]
    assert first != second


def test_dispatched_run_never_listed_is_transient(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    gh.dispatch_without_run_id()
    gh.list_lag = 1000
    with pytest.raises(TransientRunnerError, match="no run named"):
        trigger(gh_runner)
    assert gh.request_count("POST", "/dispatches") == 1


def test_timeout_on_dispatch_looks_the_run_up(
    gh: FakeGitHub, make_gh_runner: Callable[..., GitHubRunner]
) -> None:
    runner = make_gh_runner(read_timeout_s=0.2)
    gh.inject(Fault(delay_s=1.0, after_handling=True, method="POST"))
    build_id = trigger(runner)
    assert len(gh.dispatched_runs()) == 1
    assert build_id == BuildID(f"gh:octo/app/{gh.dispatched_runs()[0].id}/1")


def test_502_after_dispatch_creates_no_second_run(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    gh.inject(Fault(status=502, after_handling=True, method="POST"))
    trigger(gh_runner)
    assert len(gh.dispatched_runs()) == 1
    assert gh.request_count("POST") == 1


def test_retried_trigger_returns_the_first_run(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    assert trigger(gh_runner) == trigger(gh_runner)
    assert len(gh.dispatched_runs()) == 1


def test_inputs_over_githubs_limit_are_refused_before_dispatch(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    many = [Change(f"change-{i}", "f" * 40, {"title": "x" * 200}) for i in range(400)]
    with pytest.raises(RunnerError, match="65535") as raised:
        gh_runner.trigger("main", many, many, {CORRELATION_KEY: "req-big"})
    assert not isinstance(raised.value, TransientRunnerError)
    assert gh.request_count("POST") == 0


@pytest.mark.parametrize(
    ("status", "conclusion", "expected", "reason"),
    [
        ("requested", None, BuildStatus.ACCEPTED, None),
        ("queued", None, BuildStatus.ACCEPTED, None),
        ("pending", None, BuildStatus.ACCEPTED, None),
        ("waiting", None, BuildStatus.ACCEPTED, None),
        ("in_progress", None, BuildStatus.RUNNING, None),
        ("completed", "success", BuildStatus.SUCCEEDED, None),
        ("completed", "failure", BuildStatus.FAILED, "verdict"),
        ("completed", "neutral", BuildStatus.FAILED, "verdict"),
        ("completed", "skipped", BuildStatus.FAILED, "verdict"),
        ("completed", "stale", BuildStatus.FAILED, "verdict"),
        ("completed", "action_required", BuildStatus.FAILED, "verdict"),
        ("completed", "timed_out", BuildStatus.FAILED, "timeout"),
        ("completed", "startup_failure", BuildStatus.FAILED, "infra"),
        ("completed", "cancelled", BuildStatus.CANCELLED, None),
        ("completed", "something_new", BuildStatus.UNKNOWN, None),
        ("completed", None, BuildStatus.UNKNOWN, None),
        ("brand_new", None, BuildStatus.UNKNOWN, None),
    ],
)
def test_every_status_and_conclusion_maps(
    gh: FakeGitHub,
    gh_runner: GitHubRunner,
    status: str,
    conclusion: str | None,
    expected: BuildStatus,
    reason: str | None,
) -> None:
    build_id = trigger(gh_runner)
    gh.set_status(run_id_of(build_id), status, conclusion)

    got, meta = gh_runner.status(build_id)

    assert got is expected
    assert meta["native_state"] == status
    assert meta.get("native_conclusion") == conclusion
    assert meta.get("failure_reason") == reason
    assert meta["url"].endswith(f"/octo/app/actions/runs/{run_id_of(build_id)}")
    assert meta["run_attempt"] == "1"
    assert meta["started_at"].endswith("+00:00") and float(meta["duration_s"]) >= 0
    assert ("finished_at" in meta) is (status == "completed")


def test_run_attempt_is_pinned(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    build_id = trigger(gh_runner)
    run_id = run_id_of(build_id)
    gh.set_status(run_id, "completed", "failure")
    assert gh_runner.status(build_id)[0] is BuildStatus.FAILED

    assert gh.rerun(run_id) == 2
    gh.set_status(run_id, "completed", "success", attempt=2)

    assert gh_runner.status(build_id)[0] is BuildStatus.FAILED
    rerun = gh_runner.status(BuildID(f"gh:octo/app/{run_id}/2"))
    assert rerun[0] is BuildStatus.SUCCEEDED
    assert gh.request_count("GET", f"/runs/{run_id}/attempts/1") == 2


def test_cancel_in_progress_run(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    build_id = trigger(gh_runner)
    gh.set_status(run_id_of(build_id), "in_progress")
    gh_runner.cancel(build_id)
    assert gh.request_count("POST", "/cancel") == 1
    assert gh_runner.status(build_id)[0] is BuildStatus.CANCELLED


def test_cancel_of_finished_attempt_does_not_touch_a_rerun(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = trigger(gh_runner)
    run_id = run_id_of(build_id)
    gh.set_status(run_id, "completed", "failure")
    gh.rerun(run_id)
    gh.set_status(run_id, "in_progress", attempt=2)

    gh_runner.cancel(build_id)

    assert gh.request_count("POST", "/cancel") == 0
    assert gh.run(run_id).attempts[1].status == "in_progress"


def test_cancel_409_on_a_run_that_just_finished_is_not_an_error(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = trigger(gh_runner)
    gh.set_status(run_id_of(build_id), "in_progress")
    gh.inject(Fault(status=409, method="POST", path="/cancel"))
    gh_runner.cancel(build_id)
    assert [r.status for r in gh.requests_matching("POST", "/cancel")] == [409]


def test_status_uses_etag_and_304_does_not_cost_budget(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = trigger(gh_runner)
    first = gh_runner.status(build_id)
    remaining = gh.rate.remaining
    second = gh_runner.status(build_id)

    # Same body (the cached one); only the running duration moved on.
    assert first[0] == second[0]
    assert {**first[1], "duration_s": ""} == {**second[1], "duration_s": ""}
    assert [r.status for r in gh.requests_matching("GET", "/attempts/1")] == [200, 304]
    assert gh.rate.remaining == remaining


def test_unknown_ids_are_not_found(gh_runner: GitHubRunner) -> None:
    for raw in ("gh:octo/app/999999/1", "gh:octo/app/1/x", "bk:acme/app/1", "gh:../../x/1/1"):
        with pytest.raises(BuildNotFound):
            gh_runner.status(BuildID(raw))


def test_attempt_that_does_not_exist_is_not_found(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    run_id = run_id_of(trigger(gh_runner))
    with pytest.raises(BuildNotFound):
        gh_runner.status(BuildID(f"gh:octo/app/{run_id}/2"))


def test_unknown_workflow_is_a_config_error_not_not_found(
    make_gh_runner: Callable[..., GitHubRunner],
) -> None:
    runner = make_gh_runner(workflow="missing.yml")
    with pytest.raises(RunnerError, match="404") as raised:
        trigger(runner)
    assert not isinstance(raised.value, BuildNotFound)


def test_token_matching_is_by_whole_word() -> None:
    assert mentions_token("buildq req-1", "req-1")
    assert mentions_token("[req-1] merge queue", "req-1")
    assert not mentions_token("buildq req-12", "req-1")
    assert not mentions_token("buildq xreq-1", "req-1")
    assert not mentions_token(None, "req-1")
