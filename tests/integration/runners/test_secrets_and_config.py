"""Config tables for both runners, and the token kept out of logs, errors and reprs."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog

from buildq.buildrunner.buildkite import BuildkiteConfig, BuildkiteRunner
from buildq.buildrunner.buildkite import make_client as make_bk_client
from buildq.buildrunner.contract import CORRELATION_KEY, BuildID, Change, RunnerError
from buildq.buildrunner.github import GitHubConfig, GitHubRunner
from buildq.config.base import ConfigError, Table
from tests.integration.runners.conftest import BK_TOKEN_ENV, buildkite_table, github_table
from tests.support.fakeci import FakeBuildkite, FakeGitHub, Fault


def exercise_failures(
    runner: BuildkiteRunner | GitHubRunner, fake: FakeBuildkite | FakeGitHub
) -> list[str]:
    """Drive a runner through success and every failure path; return the error texts."""
    texts: list[str] = []
    build_id = runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    runner.status(build_id)
    faults = [
        Fault(status=400, body={"message": f"token {fake.token} is not allowed here"}),
        Fault(status=401, count=1),
        Fault(status=500, count=10),
        Fault(status=404),
    ]
    for fault in faults:
        fake.inject(fault)
        try:
            runner.status(build_id)
        except RunnerError as err:
            texts += [str(err), repr(err), str(err.__cause__ or "")]
        fake.clear_faults()  # leftovers of a fault the runner stopped retrying
    fake.inject(Fault(status=502, after_handling=True, method="POST"))
    runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-2"})
    try:
        runner.trigger("main", [], [Change("c")], {})  # no token: must not leak either
        runner.status(
            BuildID("bk:acme/app/999" if isinstance(fake, FakeBuildkite) else "gh:octo/app/9/1")
        )
    except RunnerError as err:
        texts.append(str(err))
    return texts


@pytest.mark.parametrize("kind", ["buildkite", "github"])
def test_token_never_in_logs_errors_or_reprs(
    kind: str,
    bk: FakeBuildkite,
    gh: FakeGitHub,
    make_bk_runner: Callable[..., BuildkiteRunner],
    make_gh_runner: Callable[..., GitHubRunner],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    runner: BuildkiteRunner | GitHubRunner
    fake: FakeBuildkite | FakeGitHub
    runner, fake = (make_bk_runner(), bk) if kind == "buildkite" else (make_gh_runner(), gh)
    with structlog.testing.capture_logs() as logs:
        texts = exercise_failures(runner, fake)

    assert any("<redacted>" in text for text in texts), texts
    everything = "\n".join(
        [*texts, repr(logs), caplog.text, repr(runner.config), str(runner.config), repr(runner)]
    )
    assert fake.token not in everything
    assert logs, "the scenario should have logged retries and triggers"


def test_buildkite_config_reads_every_key(
    monkeypatch: pytest.MonkeyPatch, bk: FakeBuildkite
) -> None:
    monkeypatch.setenv(BK_TOKEN_ENV, bk.token)
    table = buildkite_table(
        bk,
        branch="release",
        commit="abc123",
        blocked_as="running",
        lookup_before_trigger=False,
        conditional_requests=False,
        retry_attempts=5,
        pace_below_fraction=0.25,
        etag_cache_size=10,
        lookup_attempts=3,
    )
    config = BuildkiteConfig.from_table(table)
    table.reject_unknown()
    assert (config.branch, config.commit, config.blocked_as) == ("release", "abc123", "running")
    assert not config.lookup_before_trigger and not config.conditional_requests
    assert (config.http.retry_attempts, config.http.pace_below_fraction) == (5, 0.25)
    assert config.http.api_url == bk.url
    assert config.http.token.reveal() == bk.token
    assert config.http.token.source == f"env:{BK_TOKEN_ENV}"
    client = make_bk_client(config)
    try:
        assert str(client.base_url).rstrip("/") == bk.url
        assert client.timeout.connect == config.http.connect_timeout_s
        assert client.timeout.read == config.http.read_timeout_s
        assert bk.token not in repr(client.headers)
    finally:
        client.close()


def test_github_config_token_from_file(tmp_path: Path, gh: FakeGitHub) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(gh.token + "\n")
    token_file.chmod(0o600)
    data = {k: v for k, v in github_table(gh).data.items() if k != "token_env"}
    data |= {"token_file": str(token_file), "ref": "develop", "return_run_details": False}
    table = Table("runners.gha", data)
    config = GitHubConfig.from_table(table)
    table.reject_unknown()
    assert config.http.token.reveal() == gh.token
    assert (config.ref, config.return_run_details) == ("develop", False)
    assert gh.token not in repr(config)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"blocked_as": "ignored"}, "runners.ci.blocked_as"),
        ({"organization": ""}, "runners.ci.organization"),
        ({"token": "inline-secret"}, "runners.ci.token"),
        ({"token_env": "BUILDQ_TEST_UNSET_VARIABLE"}, "runners.ci.token_env"),
        ({"retry_attempts": 0}, "runners.ci.retry_attempts"),
        ({"type": "github"}, "runners.ci.type"),
        ({"read_timeout": 3}, "runners.ci.read_timeout"),
    ],
)
def test_buildkite_config_errors_name_the_key(
    monkeypatch: pytest.MonkeyPatch, bk: FakeBuildkite, overrides: dict[str, object], key: str
) -> None:
    monkeypatch.setenv(BK_TOKEN_ENV, bk.token)
    with pytest.raises(ConfigError) as raised:
        table = buildkite_table(bk, **overrides)
        BuildkiteConfig.from_table(table)
        table.reject_unknown()
    assert raised.value.key == key
    assert "inline-secret" not in str(raised.value)
