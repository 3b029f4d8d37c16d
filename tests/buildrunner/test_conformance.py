"""The conformance checks, run against every local backend."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from buildq.buildrunner.command import CommandConfig, CommandRunner
from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.buildrunner.noop import NoopConfig, NoopRunner
from buildq.buildrunner.sim import SimConfig, SimProfile, SimRunner, Span
from buildq.testing import conformance
from tests.support.runners import FakeClock, stop_command_builds
from tests.support.waiting import wait_until


@dataclass
class Case:
    runner: BuildRunner
    finish: Callable[[BuildID], None]
    unknown_ids: tuple[str, ...]


def _noop(_tmp_path: Path) -> Iterator[Case]:
    yield Case(NoopRunner(NoopConfig()), lambda _build: None, conformance.GENERIC_UNKNOWN_IDS)


def _sim(tmp_path: Path) -> Iterator[Case]:
    clock = FakeClock(time.time())
    profile = SimProfile(Span(1.0, 2.0), Span(3.0, 4.0), failure_probability=0.5)
    runner = SimRunner(SimConfig(profile, seed=7, state_dir=tmp_path / "sim"), clock=clock)
    unknown = (*conformance.GENERIC_UNKNOWN_IDS, "sim-1-2-3-x-0000000000000000", "noop-1")
    yield Case(runner, lambda _build: clock.advance(10.0), unknown)


def _command(tmp_path: Path) -> Iterator[Case]:
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


@pytest.fixture(params=[_noop, _sim, _command], ids=["noop", "sim", "command"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    yield from request.param(tmp_path)


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


def test_every_status_declares_terminality() -> None:
    conformance.check_status_terminality()


def test_malformed_build_id_payloads_raise() -> None:
    conformance.check_malformed_build_id_payloads()


def test_change_json_round_trip() -> None:
    conformance.check_change_round_trip()
