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

from buildq.buildrunner import BuildRunner, registry
from buildq.config import ConfigError, Table
from buildq.queue.worker import LaneSettings
from buildq.storage.columns import RUNNER_NAME_MAX

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


def lane_settings(table: Table, calls_wait: bool) -> LaneSettings:
    """The runner's lane: its table's lane keys, by default 16 calls at once for a runner whose
    calls wait (on a network, a process, a delayed sim) and none (calls on the fetching thread)
    for one whose calls never do."""
    timeout = table.float("call_timeout_s", 300.0, min=0.0)
    return LaneSettings(
        concurrency=table.int("max_concurrent_calls", 16 if calls_wait else 0, min=0, max=1024),
        room=table.int("max_waiting_calls", 1_000, min=0, max=1_000_000),
        call_timeout_s=timeout or None,
    )


def wire_runner(name: str, table: Table, wired: WiredRunners) -> None:
    """Build the runner a ``[runners.NAME]`` table describes, built in or from a plugin."""
    from buildq.webhook import route_for

    kind = registry.for_table(table)
    try:
        config = kind.validate(table)
        wired.runners[name] = kind.factory(name, config)
    except (ConfigError, OSError, ValueError):
        raise
    except Exception as err:
        if kind.source == registry.BUILTIN:
            raise
        # A plugin may fail in any way; the operator needs one line naming the package.
        raise ConfigError(
            table.key("type"), kind.name, f"a working runner plugin ({kind.source}: {err!r:.200})"
        ) from None
    wired.lanes[name] = lane_settings(table, kind.calls_wait(config))
    route = route_for(name, config, kind.name) if kind.webhook is not None else None
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
