"""The shared BuildRunner conformance checks, run against the HTTP backends and their fakes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.buildrunner.github import GitHubRunner
from buildq.testing import conformance
from tests.support.fakeci import FakeBuildkite, FakeGitHub


@dataclass
class Case:
    runner: BuildRunner
    finish: Callable[[BuildID], None]
    unknown_ids: tuple[str, ...]


@pytest.fixture(params=["buildkite", "github"])
def case(
    request: pytest.FixtureRequest,
    bk: FakeBuildkite,
    gh: FakeGitHub,
    make_bk_runner: Callable[..., BuildkiteRunner],
    make_gh_runner: Callable[..., GitHubRunner],
) -> Case:
    if request.param == "buildkite":
        return Case(
            make_bk_runner(),
            lambda build_id: bk.set_state(int(build_id.id.rsplit("/", 1)[1]), "passed"),
            (
                *conformance.GENERIC_UNKNOWN_IDS,
                "bk:acme/app/424242",
                "bk:acme/app/1/1",
                "gh:octo/app/1/1",
            ),
        )
    return Case(
        make_gh_runner(),
        lambda build_id: gh.set_status(int(build_id.id.split("/")[2]), "completed", "success"),
        (
            *conformance.GENERIC_UNKNOWN_IDS,
            "gh:octo/app/424242/1",
            "gh:octo/app/1",
            "bk:acme/app/1",
        ),
    )


def test_is_a_build_runner(case: Case) -> None:
    assert isinstance(case.runner, BuildRunner)


def test_trigger_returns_promptly(case: Case) -> None:
    build_id = conformance.check_trigger_returns_promptly(case.runner)
    conformance.check_status_metadata_is_strings(case.runner, build_id)


def test_status_of_unknown_build_raises_not_found(case: Case) -> None:
    conformance.check_unknown_build_not_found(case.runner, case.unknown_ids)


def test_cancel_of_terminal_build_changes_nothing(case: Case) -> None:
    conformance.check_cancel_of_terminal_build_is_noop(case.runner, case.finish)


def test_build_id_round_trips_through_payload(case: Case) -> None:
    conformance.check_build_id_round_trip(case.runner)


def test_hostile_changes_are_accepted(case: Case) -> None:
    build_id = conformance.check_hostile_changes_accepted(case.runner)
    case.finish(build_id)
    conformance.check_status_metadata_is_strings(case.runner, build_id)


def test_close_releases_the_http_client(case: Case) -> None:
    # The daemon's wiring closes every runner that has ``close`` when it stops.
    runner = case.runner
    assert isinstance(runner, BuildkiteRunner | GitHubRunner)
    client = runner._core.client
    assert not client.is_closed
    runner.close()
    assert client.is_closed
