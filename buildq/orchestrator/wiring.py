"""The one place config becomes backends: runners by name, and their webhook routes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from buildq.buildrunner import BuildRunner
from buildq.config import ConfigError, Table
from buildq.orchestrator.schema import RUNNER_NAME_MAX

if TYPE_CHECKING:
    from buildq.webhook import WebhookRoute


@dataclass
class WiredRunners:
    runners: dict[str, BuildRunner] = field(default_factory=dict)
    #: Routes for runners whose table names a webhook secret.
    routes: list[WebhookRoute] = field(default_factory=list)

    def close(self) -> None:
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


def _rest(table: Table) -> Table:
    """The table without ``type``, which only selects the backend."""
    return Table(table.path, {k: v for k, v in table.data.items() if k != "type"}, table.origin)


def wire_runner(name: str, table: Table, wired: WiredRunners) -> None:
    kind = table.choice("type", ("noop", "sim", "command", "buildkite", "github"))
    rest = _rest(table)
    runner: BuildRunner
    if kind == "noop":
        from buildq.buildrunner.noop import NoopConfig, NoopRunner

        runner = NoopRunner(NoopConfig.from_table(rest))
    elif kind == "sim":
        from buildq.buildrunner.sim import SimConfig, SimRunner

        runner = SimRunner(SimConfig.from_table(rest))
    elif kind == "command":
        from buildq.buildrunner.command import CommandConfig, CommandRunner

        runner = CommandRunner(CommandConfig.from_table(rest))
    elif kind == "buildkite":
        from buildq.buildrunner import buildkite
        from buildq.webhook import route_for

        bk = buildkite.BuildkiteConfig.from_table(rest)
        runner = buildkite.BuildkiteRunner(bk, buildkite.make_client(bk), name=name)
        _add_route(wired, route_for(name, bk))
    else:
        from buildq.buildrunner import github
        from buildq.webhook import route_for

        gh = github.GitHubConfig.from_table(rest)
        runner = github.GitHubRunner(gh, github.make_client(gh), name=name)
        _add_route(wired, route_for(name, gh))
    wired.runners[name] = runner


def _add_route(wired: WiredRunners, route: WebhookRoute | None) -> None:
    if route is not None:
        wired.routes.append(route)


def runners_from_config(tables: Mapping[str, Table]) -> WiredRunners:
    """Build and validate every ``[runners.NAME]``: a bad one stops start-up, naming the key."""
    wired = WiredRunners()
    for name, table in tables.items():
        if len(name) > RUNNER_NAME_MAX:
            # builds.runner holds the name; a longer one would be cut short on MySQL.
            raise ConfigError(
                table.path, name, f"a runner name of 1 to {RUNNER_NAME_MAX} characters"
            )
        try:
            wire_runner(name, table, wired)
        except ConfigError:
            raise
        except (OSError, ValueError) as err:
            raise ConfigError(table.path, "(table)", f"a usable runner ({err})") from None
    return wired
