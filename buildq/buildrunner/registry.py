"""Runner kinds: what a ``[runners.NAME]`` table's ``type`` can name, built in or from a plugin.

A kind is a ``RunnerKind``: how to validate the table (its config class's reader), how to
build the runner from the validated config, and optionally how to read the CI service's
webhook deliveries and what ``buildq doctor`` asks the CI service (``DoctorRow`` rows).
Config loading, the daemon's wiring, ``buildq doctor`` and the webhook receiver all ask this
module, so a kind added by a plugin is treated exactly like a built-in.

Plugins are Python distributions that declare an entry point in the ``buildq.runners`` group
whose name is the kind and whose object is a ``RunnerKind``::

    [project.entry-points."buildq.runners"]
    example = "buildq_example_runner:KIND"

A missing or broken plugin is a ``ConfigError`` naming the kind and the distribution, raised
when a config uses it (``buildq doctor`` also lists broken ones it finds installed).
Built-in kinds are imported only when used.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any, NamedTuple, Protocol

from buildq.buildrunner.contract import BuildID, BuildRunner
from buildq.config.base import ConfigError, Secret, Table
from buildq.storage.errors import first_line

ENTRY_POINT_GROUP = "buildq.runners"
BUILTIN = "buildq"
#: Keys every runner table takes besides its kind's own: ``type``, and the daemon's lane of
#: the runner (``buildq.orchestrator.wiring.lane_settings``).
GENERIC_KEYS = frozenset({"type", "max_concurrent_calls", "max_waiting_calls", "call_timeout_s"})


def _calls_wait(_config: Any) -> bool:
    return True


class MalformedEvent(ValueError):
    """A webhook delivery is about a build but does not say which one (answered 400)."""


class Verify(Protocol):
    def __call__(
        self,
        headers: Mapping[str, str],
        body: bytes,
        secret: str,
        *,
        now: float,
        tolerance_s: float,
    ) -> str | None:
        """None if the delivery is authentic, else a short reason (never echoing values)."""
        ...


@dataclass(frozen=True, slots=True)
class WebhookSpec:
    """How a kind's CI service signs its deliveries and names the build in them.

    ``headers`` are keyed by lower-case name. ``decode`` returns the BuildID the runner gave
    the build, None for a delivery that is not about a build (answered 200 and ignored), or
    raises MalformedEvent.
    """

    verify: Verify
    decode: Callable[[Mapping[str, str], Mapping[str, Any]], BuildID | None]
    #: Which attribute of the kind's config holds the secret; no secret, no route.
    secret_attribute: str = "webhook_secret"

    def secret(self, config: object) -> Secret | None:
        value = getattr(config, self.secret_attribute, None)
        return value if isinstance(value, Secret) else None


class DoctorRow(NamedTuple):
    """One line of ``buildq doctor``'s table, as a kind's doctor hook reports it."""

    name: str  # "runner <name> api", "runner <name> siblings", ...
    status: str  # "ok", "WARN" (fails nothing), "FAIL" or "skip" (could not be checked)
    detail: str
    fix: str = ""


#: A kind's questions to its CI service for ``buildq doctor`` (not run with ``--offline``):
#: given the runner's name and validated config, the rows to show. Raising RunnerError
#: (RunnerUnauthorized, TransientRunnerError) when it cannot ask is fine: doctor turns that
#: into a FAIL row with the fix.
DoctorHook = Callable[[str, Any], list[DoctorRow]]


@dataclass(frozen=True, slots=True)
class RunnerKind:
    """One runner ``type``: validate its table, build its runner, read its webhooks."""

    name: str
    #: Reads and validates the table (``type`` removed); must build nothing (doctor calls it).
    config: Callable[[Table], Any]
    #: Builds the runner named ``runner_name`` from what ``config`` returned.
    factory: Callable[[str, Any], BuildRunner]
    webhook: WebhookSpec | None = None
    #: Who provides it: "buildq", or the plugin's distribution name and version.
    source: str = BUILTIN
    #: Whether a runner with this config may wait in its calls (on a network, a process): its
    #: calls then run on threads of their own; one whose calls never wait (noop) is called
    #: on the thread that fetched the work.
    calls_wait: Callable[[Any], bool] = _calls_wait
    #: What ``buildq doctor`` asks the CI service (token access, settings that cancel
    #: buildq's builds); None: only the config is checked.
    doctor: DoctorHook | None = None

    def validate(self, table: Table) -> Any:
        """The config object for ``table`` (with ``type``); unknown keys are refused."""
        own = {k: v for k, v in table.data.items() if k not in GENERIC_KEYS}
        rest = Table(table.path, own, table.origin)
        config = self.config(rest)
        rest.reject_unknown()
        return config


#: The built-in kinds. Each is the module of that name in this package, whose ``RUNNER_KIND``
#: describes it; a module is imported only when a config names its kind.
_BUILTINS = ("noop", "sim", "command", "buildkite", "github", "gitlab", "jenkins", "buildbot")


def _builtin(name: str) -> RunnerKind:
    kind: RunnerKind = importlib.import_module(f"buildq.buildrunner.{name}").RUNNER_KIND
    return kind


def _entry_points() -> dict[str, metadata.EntryPoint]:
    found: dict[str, metadata.EntryPoint] = {}
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        # A plugin cannot replace a built-in kind: the config would mean something else.
        if entry.name not in _BUILTINS:
            found.setdefault(entry.name, entry)
    return found


def _provider(entry: metadata.EntryPoint) -> str:
    dist = entry.dist
    return f"{dist.name} {dist.version}" if dist is not None else entry.value


def kind_names() -> list[str]:
    """Every kind a config may name: built-ins first, then installed plugins."""
    return [*_BUILTINS, *sorted(_entry_points())]


class _PluginBroken(Exception):
    def __init__(self, provider: str, why: str) -> None:
        super().__init__(why)
        self.provider = provider


@functools.cache
def _load_plugin(name: str, entry: metadata.EntryPoint) -> RunnerKind:
    provider = _provider(entry)
    try:
        loaded = entry.load()
    except Exception as err:  # a plugin's import can fail in any way; one line names it
        raise _PluginBroken(provider, f"{type(err).__name__}: {err}") from None
    if not isinstance(loaded, RunnerKind) or loaded.name != name:
        raise _PluginBroken(provider, f"{entry.value} is not a RunnerKind named {name!r}")
    return dataclasses.replace(loaded, source=provider)


def _broken(key: str, name: str, err: _PluginBroken) -> ConfigError:
    return ConfigError(
        key,
        name,
        f"a working runner plugin (package {err.provider} failed: {first_line(err, 200)})",
    )


def get(name: str, key: str = "type") -> RunnerKind:
    """The kind called ``name``; ConfigError on ``key`` if none, or if its plugin is broken."""
    if name in _BUILTINS:
        return _builtin(name)
    entry = _entry_points().get(name)
    if entry is None:
        raise ConfigError(
            key,
            name,
            # The name is the error's value (shown cut short): not repeated here in full.
            f"one of {', '.join(kind_names())} (no installed package provides that runner "
            f"type in the entry-point group {ENTRY_POINT_GROUP})",
        )
    try:
        return _load_plugin(name, entry)
    except _PluginBroken as err:
        raise _broken(key, name, err) from None


def for_table(table: Table) -> RunnerKind:
    """The kind a ``[runners.NAME]`` table's ``type`` names (see ``get``)."""
    name = table.data.get("type")
    if not isinstance(name, str) or not name:
        raise ConfigError(table.key("type"), name, "one of " + ", ".join(kind_names()))
    return get(name, table.key("type"))


def plugins() -> list[tuple[str, str, str | None]]:
    """Installed plugins as (kind, provider, error or None), for ``buildq doctor``."""
    out: list[tuple[str, str, str | None]] = []
    for name, entry in sorted(_entry_points().items()):
        try:
            out.append((name, _load_plugin(name, entry).source, None))
        except _PluginBroken as err:
            out.append((name, err.provider, str(_broken("type", name, err))))
    return out
