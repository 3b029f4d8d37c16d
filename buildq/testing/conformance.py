"""Checks every BuildRunner backend must pass, as plain functions any test can call
(``suite.RunnerConformance`` runs them all as a pytest class).

A backend's test module builds its runner, plus the hooks a check needs (how to make a build
reach a terminal state, which ids it can never know), and calls these. The contract-level
checks (enum, payload envelope, Change JSON) take no runner: they hold for all backends alike
and are collected here so a backend's suite can show the whole contract passing next to it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

import pytest

from buildq.buildrunner.contract import (
    BuildID,
    BuildNotFound,
    BuildRunner,
    BuildStatus,
    Change,
    MalformedPayload,
)

#: Makes the given build reach a terminal state (advance a fake clock, wait on the process...).
Finish = Callable[[BuildID], None]

#: Ids no runner may resolve: foreign, hostile as a path, or simply made up.
GENERIC_UNKNOWN_IDS = (
    "does-not-exist",
    "../../../etc/passwd",
    "/etc/passwd",
    "a/b",
    "x" * 300,
    "\u00e9t\u00e9-\u2603",
    "id\x00with-nul",
)

HOSTILE_CHANGES = (
    Change("plain", "0123abcd"),
    Change('quote\'s "double" `back`', "$(rm -rf /); echo pwned"),
    Change("unicode \u00e9\u00e8 \u2603 \U0001f680 \u4e2d\u6587", "refs/heads/\u00fcber"),
    Change("newline\nand\ttab", "", {"key with space": 'v\\al"ue', "\u00e9": "\U0001f600"}),
)


def check_trigger_returns_promptly(runner: BuildRunner, limit_s: float = 2.0) -> BuildID:
    started = time.monotonic()
    build_id = runner.trigger("conformance", [Change("base-1")], [Change("head-1", "abc")], {})
    elapsed = time.monotonic() - started
    assert elapsed < limit_s, f"trigger took {elapsed:.3f} s"
    assert isinstance(build_id, BuildID)
    return build_id


def check_unknown_build_not_found(runner: BuildRunner, unknown_ids: Iterable[str]) -> None:
    for raw in unknown_ids:
        with pytest.raises(BuildNotFound):
            runner.status(BuildID(raw))


def check_status_metadata_is_strings(runner: BuildRunner, build_id: BuildID) -> None:
    status, metadata = runner.status(build_id)
    assert isinstance(status, BuildStatus)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())


def check_cancel_of_terminal_build_is_noop(runner: BuildRunner, finish: Finish) -> None:
    build_id = runner.trigger("conformance", [], [Change("head-1")], {})
    finish(build_id)
    before = runner.status(build_id)
    assert before[0].is_terminal, before
    runner.cancel(build_id)
    runner.cancel(build_id)
    assert runner.status(build_id) == before


def check_build_id_round_trip(runner: BuildRunner) -> None:
    """An id survives the queue envelope and still names the same build."""
    build_id = runner.trigger("conformance", [], [Change("head-1")], {})
    decoded = BuildID.from_bytes(build_id.to_bytes())
    assert decoded == build_id
    assert runner.status(decoded)[0] is not None
    assert json.loads(build_id.to_bytes()) == {"id": build_id.id}


def check_hostile_changes_accepted(runner: BuildRunner) -> BuildID:
    metadata = {"requester": 'O\'Brien "ops" \u00e9', "ticket": "$(id)"}
    return runner.trigger("conformance", HOSTILE_CHANGES[:2], HOSTILE_CHANGES[2:], metadata)


def check_status_terminality() -> None:
    expected = {
        BuildStatus.ACCEPTED: False,
        BuildStatus.RUNNING: False,
        BuildStatus.SUCCEEDED: True,
        BuildStatus.FAILED: True,
        BuildStatus.CANCELLED: True,
        BuildStatus.UNKNOWN: False,
    }
    assert set(expected) == set(BuildStatus), "a new status needs a decision here"
    for status, terminal in expected.items():
        assert status.is_terminal is terminal, status


def check_malformed_build_id_payloads() -> None:
    payloads = [
        b"not json",
        b"",
        b"[1, 2]",
        b'"just a string"',
        b"{}",
        b'{"identifier": "x"}',
        b'{"id": 42}',
        b'{"id": null}',
        b'{"id": ""}',
        b'{"id": ["x"]}',
        b"\xff\xfe{\x00",
        b'{"id": "\xc3\x28"}',
        b"[" * 100_000,
    ]
    for raw in payloads:
        with pytest.raises(MalformedPayload):
            BuildID.from_bytes(raw)


def check_change_round_trip() -> None:
    for change in HOSTILE_CHANGES:
        encoded = json.dumps(change.to_json(), ensure_ascii=False).encode()
        assert Change.from_json(json.loads(encoded)) == change
    bad_values: list[object] = [
        None,
        "x",
        [],
        {"revision": "r"},
        {"id": 3},
        {"id": "a", "extra": []},
    ]
    bad_values.append({"id": "a", "extra": {"k": 1}})
    for bad in bad_values:
        with pytest.raises(MalformedPayload):
            Change.from_json(bad)
