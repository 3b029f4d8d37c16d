"""The ``RunnerKind`` of each runner that predates the registry (``registry`` imports this
only when a config names one of them).

Newer backends (``gitlab``, ``jenkins``, ``buildbot``) describe themselves in their own
module as ``RUNNER_KIND``; these five are described here so their modules stay as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buildq.buildrunner import buildkite, github
from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.buildrunner.registry import MalformedEvent, RunnerKind, WebhookSpec
from buildq.config.base import Table


def _noop_config(table: Table) -> Any:
    from buildq.buildrunner.noop import NoopConfig

    return NoopConfig.from_table(table)


def _noop(_name: str, config: Any) -> BuildRunner:
    from buildq.buildrunner.noop import NoopRunner

    return NoopRunner(config)


def _sim_config(table: Table) -> Any:
    from buildq.buildrunner.sim import SimConfig

    return SimConfig.from_table(table)


def _sim(_name: str, config: Any) -> BuildRunner:
    from buildq.buildrunner.sim import SimRunner

    return SimRunner(config)


def _command_config(table: Table) -> Any:
    from buildq.buildrunner.command import CommandConfig

    return CommandConfig.from_table(table)


def _command(_name: str, config: Any) -> BuildRunner:
    from buildq.buildrunner.command import CommandRunner

    return CommandRunner(config)


def _buildkite(name: str, config: buildkite.BuildkiteConfig) -> BuildRunner:
    return buildkite.BuildkiteRunner(config, buildkite.make_client(config), name=name)


def _github(name: str, config: github.GitHubConfig) -> BuildRunner:
    return github.GitHubRunner(config, github.make_client(config), name=name)


def _verify_buildkite(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    from buildq.webhook import verify_buildkite

    return verify_buildkite(
        headers.get("x-buildkite-signature"), body, secret, now=now, tolerance_s=tolerance_s
    )


def _verify_github(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    from buildq.webhook import verify_github

    return verify_github(headers.get("x-hub-signature-256"), body, secret)


def _decode_buildkite(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    if not headers.get("x-buildkite-event", "").startswith("build."):
        return None  # ping, job events: nothing to poll
    found = buildkite.build_id_from_event(payload)
    if found is None:
        raise MalformedEvent("no build in a build event")
    return found


def _decode_github(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    if headers.get("x-github-event", "") != "workflow_run":
        return None
    found = github.build_id_from_event(payload)
    if found is None:
        raise MalformedEvent("no run in a workflow_run event")
    return found


NOOP = RunnerKind("noop", _noop_config, _noop, calls_wait=lambda _config: False)
SIM = RunnerKind("sim", _sim_config, _sim, calls_wait=lambda config: bool(config.blocks))
COMMAND = RunnerKind("command", _command_config, _command)
BUILDKITE = RunnerKind(
    buildkite.KIND,
    buildkite.BuildkiteConfig.from_table,
    _buildkite,
    WebhookSpec(_verify_buildkite, _decode_buildkite),
)
GITHUB = RunnerKind(
    github.KIND,
    github.GitHubConfig.from_table,
    _github,
    WebhookSpec(_verify_github, _decode_github),
)
