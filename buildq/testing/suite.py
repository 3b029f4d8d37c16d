"""The runner conformance suite as a pytest class, for built-in backends and plugins alike.

Subclass ``RunnerConformance`` and provide two fixtures: ``runner`` (the BuildRunner under
test, pointed at whatever it drives in tests) and ``finish`` (a callable that makes a given
build reach a terminal state). Override ``unknown_ids`` to add ids of your own format that
name no build. Every test below is then collected for your class.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.testing import conformance

Finish = Callable[[BuildID], None]


class RunnerConformance:
    """The BuildRunner contract, checked against ``runner``."""

    @pytest.fixture
    def unknown_ids(self) -> tuple[str, ...]:
        return conformance.GENERIC_UNKNOWN_IDS

    def test_is_a_build_runner(self, runner: BuildRunner) -> None:
        assert isinstance(runner, BuildRunner)

    def test_trigger_returns_promptly(self, runner: BuildRunner) -> None:
        build_id = conformance.check_trigger_returns_promptly(runner)
        conformance.check_status_metadata_is_strings(runner, build_id)

    def test_status_of_unknown_build_raises_not_found(
        self, runner: BuildRunner, unknown_ids: tuple[str, ...]
    ) -> None:
        conformance.check_unknown_build_not_found(runner, unknown_ids)

    def test_cancel_of_terminal_build_changes_nothing(
        self, runner: BuildRunner, finish: Finish
    ) -> None:
        conformance.check_cancel_of_terminal_build_is_noop(runner, finish)

    def test_build_id_round_trips_through_payload(self, runner: BuildRunner) -> None:
        conformance.check_build_id_round_trip(runner)

    def test_hostile_changes_are_accepted(self, runner: BuildRunner, finish: Finish) -> None:
        build_id = conformance.check_hostile_changes_accepted(runner)
        finish(build_id)
        conformance.check_status_metadata_is_strings(runner, build_id)

    def test_every_status_declares_terminality(self) -> None:
        conformance.check_status_terminality()

    def test_malformed_build_id_payloads_raise(self) -> None:
        conformance.check_malformed_build_id_payloads()

    def test_change_json_round_trip(self) -> None:
        conformance.check_change_round_trip()
