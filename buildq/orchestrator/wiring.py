"""The one place config becomes backends: runners by name, their lanes and webhook routes.

Every runner table takes three keys besides its backend's own, for the worker's lane of that
runner (``buildq.queue.worker``): ``max_concurrent_calls`` (0: calls are made on the fetching
thread, for runners whose calls never wait, such as noop and an undelayed sim),
``max_waiting_calls`` and ``call_timeout_s``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from buildq.buildrunner import BuildRunner
from buildq.config import ConfigError, Table
from buildq.orchestrator.schema import RUNNER_NAME_MAX
from buildq.queue.worker import LaneSettings

#: Keys of every runner table that configure its lane, not its backend.
LANE_KEYS = ("max_concurrent_calls", "max_waiting_calls", "call_timeout_s")
#: Calls in flight at once by default: HTTP runners wait on the network; noop never waits.
_DEFAULT_CONCURRENCY = {"noop": 0, "sim": 0, "command": 8, "buildkite": 16, "github": 16}

if TYPE_CHECKING:
    from buildq.webhook import WebhookRoute


@dataclass
class WiredRunners:
    runners: dict[str, BuildRunner] = field(default_factory=dict)
    #: The worker lane of each runner (same name).
    lanes: dict[str, LaneSettings] = field(default_factory=dict)
    #: Routes for runners whose table names a webhook secret.
    routes: list[WebhookRoute] = field(default_factory=list)

    def close(self) -> None:
        for runner in self.runners.values():
            close = getattr(runner, "close", None)
            if close is not None:
                close()


def _rest(table: Table) -> Table:
    """The table without ``type`` (it only selects the backend) and the lane's keys."""
    backend_keys = {k: v for k, v in table.data.items() if k != "type" and k not in LANE_KEYS}
    return Table(table.path, backend_keys, table.origin)


def lane_settings(kind: str, table: Table, *, blocking: bool = False) -> LaneSettings:
    """The lane of a runner of ``kind`` (``blocking``: a sim told to delay its answers)."""
    default = _DEFAULT_CONCURRENCY.get(kind, 16) or (16 if blocking else 0)
    timeout = table.float("call_timeout_s", 300.0, min=0.0)
    return LaneSettings(
        concurrency=table.int("max_concurrent_calls", default, min=0, max=1024),
        room=table.int("max_waiting_calls", 1_000, min=0, max=1_000_000),
        call_timeout_s=timeout or None,
    )


def wire_runner(name: str, table: Table, wired: WiredRunners) -> None:
    kind = table.choice("type", ("noop", "sim", "command", "buildkite", "github"))
    rest = _rest(table)
    runner: BuildRunner
    if kind == "noop":
        from buildq.buildrunner.noop import NoopConfig, NoopRunner

        runner = NoopRunner(NoopConfig.from_table(rest))
    elif kind == "sim":
        from buildq.buildrunner.sim import SimConfig, SimRunner

        sim = SimConfig.from_table(rest)
        runner = SimRunner(sim)
        wired.lanes[name] = lane_settings(kind, table, blocking=sim.blocks)
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
    if name not in wired.lanes:
        wired.lanes[name] = lane_settings(kind, table)


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
