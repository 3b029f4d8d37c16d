"""Fixtures of the runner tests: a fake vendor on 127.0.0.1 and factories for runners pointed
at it; and the one warning these tests may leave.

Runners are built the way the daemon will build them: a TOML-shaped table validated by the
backend's registry entry, the runner (and its client) built by the entry's factory. Timeouts, back-offs and
lookup intervals are shrunk so failure paths take milliseconds.

The warning: the command runner starts each build under a supervisor in its own session, which
must outlive the runner (and the daemon: docs/runners.md). A runner object dropped while its
supervisors run, or before it reaped the ones a test killed, makes ``Popen.__del__`` warn
"subprocess N is still running". That is the design, not a leak (``stop_command_builds`` ends
every build a test started), so it is exempt here, and only here; runners in reference cycles
are collected at the end of each test, under the exemption, rather than during a later,
unrelated one.
"""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from buildq.buildrunner import registry
from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.contract import BuildID
from buildq.buildrunner.github import GitHubRunner
from buildq.buildrunner.gitlab import GitLabRunner
from buildq.buildrunner.jenkins import JenkinsRunner, parse_build_id
from buildq.config.base import Table
from tests.support.fakeci import FakeBuildkite, FakeGitHub
from tests.support.fakeci.gitlab import FakeGitLab
from tests.support.fakeci.jenkins import FakeJenkins

BK_TOKEN_ENV = "BUILDQ_TEST_BUILDKITE_TOKEN"
GH_TOKEN_ENV = "BUILDQ_TEST_GITHUB_TOKEN"

SUPERVISOR_OUTLIVES_RUNNER = r"ignore:subprocess \d+ is still running:ResourceWarning"
HERE = Path(__file__).parent

FAST = {
    "connect_timeout_s": 1.0,
    "read_timeout_s": 2.0,
    "retry_backoff_s": 0.01,
    "retry_max_backoff_s": 0.05,
    "lookup_interval_s": 0.02,
    "max_rate_wait_s": 5.0,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent == HERE:
            item.add_marker(pytest.mark.filterwarnings(SUPERVISOR_OUTLIVES_RUNNER))


@pytest.fixture(autouse=True)
def _collect_dropped_runners() -> Iterator[None]:
    yield
    gc.collect()


@pytest.fixture
def bk() -> Iterator[FakeBuildkite]:
    with FakeBuildkite() as fake:
        yield fake


@pytest.fixture
def gh() -> Iterator[FakeGitHub]:
    with FakeGitHub() as fake:
        yield fake


def buildkite_table(fake: FakeBuildkite, **overrides: Any) -> Table:
    data = {
        "type": "buildkite",
        "api_url": fake.url,
        "organization": fake.organization,
        "pipeline": fake.pipeline,
        "token_env": BK_TOKEN_ENV,
        **FAST,
        **overrides,
    }
    return Table("runners.ci", data)


def github_table(fake: FakeGitHub, **overrides: Any) -> Table:
    data = {
        "type": "github",
        "api_url": fake.url,
        "owner": fake.owner,
        "repo": fake.repo,
        "workflow": fake.workflow,
        "token_env": GH_TOKEN_ENV,
        **FAST,
        **overrides,
    }
    return Table("runners.gha", data)


def runner_factory(
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    name: str,
    table: Callable[..., Table],
    env: dict[str, str],
) -> Iterator[Callable[..., Any]]:
    """A ``make(**overrides)`` that builds runners of ``kind`` as the daemon does: the registry
    validates ``table(**overrides)`` and its factory builds the runner, named ``name``. ``env``
    (the tokens) is set first; every runner made is closed, with its client, after the test."""
    runners: list[Any] = []
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def make(**overrides: Any) -> Any:
        spec = registry.get(kind)
        runners.append(spec.factory(name, spec.validate(table(**overrides))))
        return runners[-1]

    yield make
    for runner in runners:
        runner.close()


@pytest.fixture
def make_bk_runner(
    bk: FakeBuildkite, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., BuildkiteRunner]]:
    table = functools.partial(buildkite_table, bk)
    yield from runner_factory(monkeypatch, "buildkite", "ci", table, {BK_TOKEN_ENV: bk.token})


@pytest.fixture
def make_gh_runner(
    gh: FakeGitHub, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., GitHubRunner]]:
    table = functools.partial(github_table, gh)
    yield from runner_factory(monkeypatch, "github", "gha", table, {GH_TOKEN_ENV: gh.token})


@pytest.fixture
def bk_runner(make_bk_runner: Callable[..., BuildkiteRunner]) -> BuildkiteRunner:
    return make_bk_runner()


@pytest.fixture
def gh_runner(make_gh_runner: Callable[..., GitHubRunner]) -> GitHubRunner:
    return make_gh_runner()


# --- GitLab and Jenkins -------------------------------------------------------------------

GL_TOKEN_ENV = "BUILDQ_TEST_GITLAB_TOKEN"
GL_TRIGGER_ENV = "BUILDQ_TEST_GITLAB_TRIGGER_TOKEN"
JK_TOKEN_ENV = "BUILDQ_TEST_JENKINS_TOKEN"


@pytest.fixture
def gl() -> Iterator[FakeGitLab]:
    with FakeGitLab() as fake:
        yield fake


@pytest.fixture
def jk() -> Iterator[FakeJenkins]:
    with FakeJenkins() as fake:
        yield fake


def pipeline_id(build_id: BuildID) -> int:
    """The GitLab pipeline a build id names (``gl:<project>/<pipeline>``)."""
    return int(build_id.id.rsplit("/", 1)[1])


def queue_id(build_id: BuildID) -> int:
    """The Jenkins queue item a build id names."""
    return parse_build_id(build_id)[1]


def gitlab_table(fake: FakeGitLab, **overrides: Any) -> Table:
    data = {
        "type": "gitlab",
        "api_url": f"{fake.url}/api/v4",
        "project": fake.project_path,
        "token_env": GL_TOKEN_ENV,
        **FAST,
        **overrides,
    }
    return Table("runners.gl", data)


def jenkins_table(fake: FakeJenkins, **overrides: Any) -> Table:
    data = {
        "type": "jenkins",
        "api_url": fake.url,
        "job": fake.job,
        "user": fake.user,
        "token_env": JK_TOKEN_ENV,
        **FAST,
        **overrides,
    }
    return Table("runners.jk", data)


@pytest.fixture
def make_gl_runner(
    gl: FakeGitLab, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., GitLabRunner]]:
    env = {GL_TOKEN_ENV: gl.token, GL_TRIGGER_ENV: gl.trigger_token}
    yield from runner_factory(monkeypatch, "gitlab", "gl", functools.partial(gitlab_table, gl), env)


@pytest.fixture
def make_jk_runner(
    jk: FakeJenkins, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., JenkinsRunner]]:
    table = functools.partial(jenkins_table, jk)
    yield from runner_factory(monkeypatch, "jenkins", "jk", table, {JK_TOKEN_ENV: jk.token})
