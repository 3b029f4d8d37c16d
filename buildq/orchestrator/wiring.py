"""The one place config becomes backends: runners by name, queues to runners."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buildq.buildrunner import BuildRunner
from buildq.config import ConfigError, Table


def runner_from_table(table: Table) -> BuildRunner:
    """Build the runner a ``[runners.NAME]`` table describes (validating it)."""
    kind = table.choice("type", ("noop", "sim", "command", "buildkite", "github"))
    rest = Table(table.path, {k: v for k, v in table.data.items() if k != "type"}, table.origin)
    if kind == "noop":
        from buildq.buildrunner.noop import NoopConfig, NoopRunner

        return NoopRunner(NoopConfig.from_table(rest))
    if kind == "sim":
        from buildq.buildrunner.sim import SimConfig, SimRunner

        return SimRunner(SimConfig.from_table(rest))
    if kind == "command":
        from buildq.buildrunner.command import CommandConfig, CommandRunner

        return CommandRunner(CommandConfig.from_table(rest))
    return _http_runner(kind, rest)


def _http_runner(kind: str, table: Table) -> BuildRunner:
    if kind == "buildkite":
        from buildq.buildrunner import buildkite

        bk_config = buildkite.BuildkiteConfig.from_table(table)
        return buildkite.BuildkiteRunner(bk_config, buildkite.make_client(bk_config))
    from buildq.buildrunner import github

    gh_config = github.GitHubConfig.from_table(table)
    return github.GitHubRunner(gh_config, github.make_client(gh_config))


def runners_from_config(tables: Mapping[str, Table]) -> dict[str, BuildRunner]:
    runners: dict[str, Any] = {}
    for name, table in tables.items():
        try:
            runners[name] = runner_from_table(table)
        except ConfigError:
            raise
        except (OSError, ValueError) as err:
            raise ConfigError(table.path, "(table)", f"a usable runner ({err})") from None
    return runners
