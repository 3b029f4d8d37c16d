"""An example buildq runner plugin: builds whose outcome the config decides.

It is what a plugin author writes: a config class read from the ``[runners.NAME]`` table, a
runner implementing the BuildRunner contract, an optional webhook spec, and one
``RunnerKind`` named in the ``buildq.runners`` entry-point group (see pyproject.toml). Like
``noop``, everything about a build is in its id, so a restarted daemon answers the same.
"""

from __future__ import annotations

import hmac
import itertools
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from buildq.buildrunner import BuildID, BuildNotFound, BuildStatus, Change
from buildq.buildrunner.registry import DoctorRow, MalformedEvent, RunnerKind, WebhookSpec
from buildq.config import Secret, Table

_ID = re.compile(r"^example-(pass|fail)-[0-9a-f]{12}-[0-9]+$")


@dataclass(frozen=True)
class ExampleConfig:
    outcome: str = "pass"
    webhook_secret: Secret | None = None

    @classmethod
    def from_table(cls, table: Table) -> ExampleConfig:
        return cls(
            outcome=table.choice("outcome", ("pass", "fail"), "pass"),
            webhook_secret=table.secret("webhook_secret", required=False),
        )


class ExampleRunner:
    def __init__(self, config: ExampleConfig) -> None:
        self.config = config
        self._prefix = f"example-{config.outcome}-{secrets.token_hex(6)}"
        self._numbers = itertools.count(1)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        return BuildID(f"{self._prefix}-{next(self._numbers)}")

    def status(self, build_id: BuildID) -> tuple[BuildStatus, dict[str, str]]:
        match = _ID.match(build_id.id)
        if match is None:
            raise BuildNotFound(f"not an example build: {build_id.id!r}")
        if match[1] == "pass":
            return BuildStatus.SUCCEEDED, {"native_state": "pass"}
        return BuildStatus.FAILED, {"native_state": "fail", "failure_reason": "verdict"}

    def cancel(self, build_id: BuildID) -> None:
        """Every example build is finished the moment it starts."""


def _verify(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    token = headers.get("x-example-token", "")
    return None if hmac.compare_digest(token.encode(), secret.encode()) else "bad_token"


def _decode(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    build = payload.get("build")
    if build is None:
        return None
    if not isinstance(build, str) or not build:
        raise MalformedEvent("build must be a build id")
    return BuildID(build)


def _doctor(name: str, config: ExampleConfig) -> list[DoctorRow]:
    """What ``buildq doctor`` shows beyond the config (a real plugin asks its CI service here,
    and may raise RunnerError when it cannot: doctor shows that as a FAIL)."""
    status = "WARN" if config.outcome == "fail" else "ok"
    return [DoctorRow(f"runner {name} outcome", status, f"every build ends {config.outcome}")]


KIND = RunnerKind(
    "example",
    ExampleConfig.from_table,
    lambda _name, config: ExampleRunner(config),
    WebhookSpec(_verify, _decode),
    doctor=_doctor,
)
