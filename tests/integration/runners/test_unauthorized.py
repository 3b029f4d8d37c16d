"""Authorization-shaped answers (issue 15, item 3): 401, 403, and a 404 for a build the runner
created whose repository or pipeline is hidden too, are ``RunnerUnauthorized``; only a build
that is gone while its parent is visible is "not found". Redirects are followed."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.buildrunner.github import GitHubRunner
from tests.support.fakeci import FakeBuildkite, FakeGitHub


def _trigger(runner: BuildkiteRunner | GitHubRunner) -> BuildID:
    return runner.trigger("main", [], [Change("c1", "r1")], {CORRELATION_KEY: "req-1"})


def _refused(call: Callable[[], object], token: str) -> RunnerUnauthorized:
    with pytest.raises(RunnerUnauthorized) as raised:
        call()
    err = raised.value
    assert isinstance(err, TransientRunnerError)  # polled again later, never failed for it
    assert token not in str(err) + err.summary
    return err


def test_github_private_repository_hidden_from_the_token(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = _trigger(gh_runner)
    gh.deny(404)  # what GitHub answers a token without access to a private repository
    err = _refused(lambda: gh_runner.status(build_id), gh.token)
    assert "404" in err.summary and f"repository {gh.owner}/{gh.repo}" in err.summary
    run_id = build_id.id.split("/")[2]
    assert run_id not in err.summary  # /readyz shows it: no build ids there
    gh.deny(None)
    assert gh_runner.status(build_id)[0] is BuildStatus.ACCEPTED


def test_github_deleted_run_in_a_visible_repository_is_not_found(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = _trigger(gh_runner)
    gh.delete_run(int(build_id.id.split("/")[2]))
    with pytest.raises(BuildNotFound):
        gh_runner.status(build_id)


def test_buildkite_pipeline_hidden_vs_build_gone(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner
) -> None:
    build_id = _trigger(bk_runner)
    bk.deny(404)
    err = _refused(lambda: bk_runner.status(build_id), bk.token)
    assert f"pipeline {bk.organization}/{bk.pipeline}" in err.summary
    bk.deny(None)
    bk.delete_build(1)
    with pytest.raises(BuildNotFound):
        bk_runner.status(build_id)


@pytest.mark.parametrize(
    ("status", "message"),
    [(401, "Bad credentials"), (403, "Resource not accessible by personal access token")],
)
def test_401_and_403_are_unauthorized_on_every_call(
    gh: FakeGitHub, gh_runner: GitHubRunner, status: int, message: str
) -> None:
    build_id = _trigger(gh_runner)
    gh.deny(status, message)
    for call in (lambda: gh_runner.status(build_id), lambda: gh_runner.cancel(build_id)):
        err = _refused(call, gh.token)
        assert err.summary.startswith(f"GitHub answered {status} ({message})")
    err = _refused(lambda: gh_runner.trigger("main", [], [Change("c2")], {}), gh.token)
    assert str(status) in str(err)


def test_a_wrong_token_is_unauthorized(
    bk: FakeBuildkite, make_bk_runner: Callable[..., BuildkiteRunner], monkeypatch
) -> None:
    runner = make_bk_runner()
    build_id = _trigger(runner)
    monkeypatch.setenv("BUILDQ_TEST_BUILDKITE_TOKEN", "bkua_revoked_0000")
    revoked = make_bk_runner()
    err = _refused(lambda: revoked.status(build_id), "bkua_revoked_0000")
    assert "401" in err.summary


def test_a_renamed_repository_is_followed(
    gh: FakeGitHub, make_gh_runner: Callable[..., GitHubRunner]
) -> None:
    gh.renamed_from = ("old-owner", "old-name")
    runner = make_gh_runner(owner="old-owner", repo="old-name")
    build_id = _trigger(runner)  # the dispatch POST is redirected with 307
    assert build_id.id.startswith("gh:old-owner/old-name/")
    gh.set_status(int(build_id.id.split("/")[2]), "in_progress")
    assert runner.status(build_id)[0] is BuildStatus.RUNNING  # GET: 301
    runner.cancel(build_id)
    assert gh.run(int(build_id.id.split("/")[2])).attempts[0].conclusion == "cancelled"
    moved = [r for r in gh.requests if r.path.startswith("/repos/old-owner/")]
    assert moved and all(r.status in (301, 307) for r in moved)
