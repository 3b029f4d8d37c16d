"""The runner conformance suite (``buildq.testing.RunnerConformance``) over every runner kind:
the built-ins, each against what it drives in tests, and the example plugin, installed as a
third party's would be.

Each case gives the suite a runner, a way to make one of its builds terminal, and ids of the
runner's own format that name no build. The contract-level checks (statuses, payloads, Change
JSON) hold for every runner alike and run once. Buildbot's case drives a real master (the
session's, shared with tests/system/e2e/test_buildbot.py): slow, like the rest of Buildbot's
tests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from buildq.buildrunner import registry
from buildq.buildrunner.buildbot import BuildbotRunner
from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.command import CommandConfig, CommandRunner
from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.buildrunner.github import GitHubRunner
from buildq.buildrunner.jenkins import token_of
from buildq.buildrunner.noop import NoopConfig, NoopRunner
from buildq.buildrunner.sim import SimConfig, SimProfile, SimRunner, Span
from buildq.config.base import Table
from buildq.testing import RunnerConformance, conformance
from tests.integration.runners.conftest import pipeline_id, queue_id
from tests.support.fakeci import FakeBuildkite, FakeGitHub
from tests.support.fakeci.gitlab import FakeGitLab
from tests.support.fakeci.jenkins import FakeJenkins
from tests.support.runners import FakeClock, stop_command_builds
from tests.support.waiting import wait_until


@dataclass
class Case:
    runner: BuildRunner
    finish: Callable[[BuildID], None]
    unknown_ids: tuple[str, ...]


def _noop(_request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    yield Case(NoopRunner(NoopConfig()), lambda _build: None, conformance.GENERIC_UNKNOWN_IDS)


def _sim(_request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    clock = FakeClock(time.time())
    profile = SimProfile(Span(1.0, 2.0), Span(3.0, 4.0), failure_probability=0.5)
    runner = SimRunner(SimConfig(profile, seed=7, state_dir=tmp_path / "sim"), clock=clock)
    unknown = (*conformance.GENERIC_UNKNOWN_IDS, "sim-1-2-3-x-0000000000000000", "noop-1")
    yield Case(runner, lambda _build: clock.advance(10.0), unknown)


def _command(_request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    config = CommandConfig(command="exit 0", work_dir=tmp_path / "cmd", max_parallel=4)
    runner = CommandRunner(config)

    def finish(build_id: BuildID) -> None:
        wait_until(lambda: runner.status(build_id)[0].is_terminal, message="a terminal build")

    unknown = (
        *conformance.GENERIC_UNKNOWN_IDS,
        "cmd-1700000000000-0123456789ab",  # well formed, never triggered
        "cmd-../../../etc",
        "cmd-1700000000000-0123456789ab/../../x",
        "noop-1",
    )
    yield Case(runner, finish, unknown)
    stop_command_builds(config.work_dir)


def _buildkite(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    bk: FakeBuildkite = request.getfixturevalue("bk")
    yield Case(
        request.getfixturevalue("make_bk_runner")(),
        lambda build_id: bk.set_state(int(build_id.id.rsplit("/", 1)[1]), "passed"),
        (
            *conformance.GENERIC_UNKNOWN_IDS,
            "bk:acme/app/424242",
            "bk:acme/app/1/1",
            "gh:octo/app/1/1",
        ),
    )


def _github(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    gh: FakeGitHub = request.getfixturevalue("gh")
    yield Case(
        request.getfixturevalue("make_gh_runner")(),
        lambda build_id: gh.set_status(int(build_id.id.split("/")[2]), "completed", "success"),
        (
            *conformance.GENERIC_UNKNOWN_IDS,
            "gh:octo/app/424242/1",
            "gh:octo/app/1",
            "bk:acme/app/1",
        ),
    )


def _gitlab(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    gl: FakeGitLab = request.getfixturevalue("gl")
    yield Case(
        request.getfixturevalue("make_gl_runner")(),
        lambda build_id: gl.set_status(pipeline_id(build_id), "success"),
        # Not an id in another project: GitLab answers 404 for a project the token cannot see
        # as for one that does not exist, so the runner reports that as a refused token
        # (test_gitlab.py), as GitHub does for a hidden repository.
        (*conformance.GENERIC_UNKNOWN_IDS, "gl:42/99999", "gl:42", "bk:a/b/1"),
    )


def _jenkins(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    jk: FakeJenkins = request.getfixturevalue("jk")
    token = token_of("nobody")
    yield Case(
        request.getfixturevalue("make_jk_runner")(),
        lambda build_id: jk.finish(jk.start_build(queue_id(build_id)), "SUCCESS"),
        (
            *conformance.GENERIC_UNKNOWN_IDS,
            f"jk:folder/app-merge/999/{token}",
            # Not an id in another job: Jenkins answers 404 for a job the user may not read as
            # for one that does not exist, so the runner reports a refusal (test_jenkins.py).
            "jk:folder/app-merge/501",
            "jk:../x/1/0123456789abcdef",
        ),
    )


def _buildbot(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    runner: BuildbotRunner = request.getfixturevalue("bb_runner")

    def finish(build_id: BuildID) -> None:
        wait_until(lambda: runner.status(build_id)[0].is_terminal, timeout=60)

    unknown = (*conformance.GENERIC_UNKNOWN_IDS, "bb:999999", "bb:0", "bb:-1", "bb:1/2")
    yield Case(runner, finish, unknown)


def _example_plugin(request: pytest.FixtureRequest, _tmp_path: Path) -> Iterator[Case]:
    request.getfixturevalue("monkeypatch").syspath_prepend(
        str(request.getfixturevalue("plugin_site"))
    )
    kind = registry.get("example")
    runner = kind.factory("ex", kind.validate(Table("runners.ex", {"type": "example"})))
    unknown = (*conformance.GENERIC_UNKNOWN_IDS, "example-pass-zz-1", "noop-1")
    yield Case(runner, lambda _build_id: None, unknown)  # example builds finish as they start


CASES = {
    "noop": _noop,
    "sim": _sim,
    "command": _command,
    "buildkite": _buildkite,
    "github": _github,
    "gitlab": _gitlab,
    "jenkins": _jenkins,
    "buildbot": _buildbot,
    "example-plugin": _example_plugin,
}
SLOW = {"buildbot"}


class TestConformance(RunnerConformance):
    @pytest.fixture(
        params=[pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES]
    )
    def case(self, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
        yield from CASES[request.param](request, tmp_path)

    @pytest.fixture
    def runner(self, case: Case) -> BuildRunner:
        return case.runner

    @pytest.fixture
    def finish(self, case: Case) -> Callable[[BuildID], None]:
        return case.finish

    @pytest.fixture
    def unknown_ids(self, case: Case) -> tuple[str, ...]:
        return case.unknown_ids


@pytest.fixture(params=["buildkite", "github"])
def http_runner(request: pytest.FixtureRequest) -> BuildRunner:
    runner: BuildRunner = request.getfixturevalue(
        "bk_runner" if request.param == "buildkite" else "gh_runner"
    )
    return runner


def test_close_releases_the_http_client(http_runner: BuildRunner) -> None:
    # The daemon's wiring closes every runner that has ``close`` when it stops.
    runner = http_runner
    assert isinstance(runner, BuildkiteRunner | GitHubRunner)
    client = runner._core.client
    assert not client.is_closed
    runner.close()
    assert client.is_closed
