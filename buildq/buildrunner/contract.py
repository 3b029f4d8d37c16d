"""The BuildRunner contract: what the orchestrator needs from any CI system.

Nothing vendor-specific lives here. Backends are sibling modules (``noop``, ``sim``,
``command``, ``buildkite``, ``github``); the daemon wires them from config and controllers
only ever see this module.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

BuildMetadata = dict[str, str]

#: Metadata key under which the orchestrator passes the build request id on ``trigger``.
#: Runners that can look a build up by it (or derive the build from it) use it to make a
#: retried trigger return the build that the first attempt created instead of a second one.
CORRELATION_KEY = "buildq_request_id"


class BuildStatus(enum.Enum):
    ACCEPTED = "ACCEPTED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    #: A native state the backend cannot map. Non-terminal: the build keeps being polled,
    #: and operators are alerted because it usually means the CI service changed.
    UNKNOWN = "UNKNOWN"

    @property
    def is_terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({BuildStatus.SUCCEEDED, BuildStatus.FAILED, BuildStatus.CANCELLED})


class MalformedPayload(ValueError):
    """Bytes that should hold a buildq value do not; the message says what was wrong."""


@dataclass(frozen=True, slots=True)
class BuildID:
    """A build's identity on its runner; also the queue payload envelope ``{"id": "..."}``."""

    id: str

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("BuildID.id must be a non-empty string")

    def __str__(self) -> str:
        return self.id

    def to_bytes(self) -> bytes:
        return json.dumps({"id": self.id}, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> BuildID:
        document = decode_json_object(raw, "BuildID payload")
        value = document.get("id")
        if not isinstance(value, str) or not value:
            raise MalformedPayload("BuildID payload needs a non-empty string field 'id'")
        return cls(value)


@dataclass(frozen=True, slots=True)
class Change:
    """One change to build: its id, the revision/ref to check out, and free-form string extras."""

    id: str
    revision: str = ""
    extra: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise ValueError("Change.id must be a non-empty string")
        if not isinstance(self.revision, str):
            raise ValueError("Change.revision must be a string")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.extra.items()):
            raise ValueError("Change.extra must map strings to strings")

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "revision": self.revision}
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, value: object) -> Change:
        if not isinstance(value, dict):
            raise MalformedPayload(f"a change must be an object, got {type(value).__name__}")
        extra = value.get("extra", {})
        if not isinstance(extra, dict):
            raise MalformedPayload("a change's 'extra' must be an object of strings")
        try:
            return cls(id=value.get("id"), revision=value.get("revision", ""), extra=extra)  # type: ignore[arg-type]
        except ValueError as err:
            raise MalformedPayload(str(err)) from None

    @classmethod
    def parse(cls, spec: str) -> Change:
        """Parse the CLI form ``ID[@REV]``."""
        change_id, _, revision = spec.partition("@")
        return cls(id=change_id, revision=revision)


def decode_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """``raw`` as a JSON object whose strings a database can store, or MalformedPayload
    naming ``what``."""
    try:
        document = json.loads(raw)
    except RecursionError:
        raise MalformedPayload(f"{what} is nested too deeply") from None
    except ValueError as err:  # bad JSON, bad UTF-8, a number too long to convert
        raise MalformedPayload(f"{what} is not JSON: {str(err)[:200]}") from None
    if not isinstance(document, dict):
        raise MalformedPayload(f"{what} must be a JSON object")
    try:
        # JSON may spell lone surrogates ("\ud800"); no database driver can store them.
        json.dumps(document, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise MalformedPayload(f"{what} holds a string that is not valid Unicode") from None
    return document


class RunnerError(Exception):
    """Base for errors a runner raises on purpose."""


class BuildNotFound(RunnerError):
    """The runner has no build with this id (never had, or forgot it). Not retryable."""


class TransientRunnerError(RunnerError):
    """The runner could not answer now (network, 5xx, rate limit); worth trying again later."""


class RunnerThrottled(TransientRunnerError):
    """The CI service's rate limit says not before ``retry_in_s``. Not a failure: the daemon
    tries again then, without counting a retry and without holding a thread meanwhile."""

    def __init__(self, message: str, retry_in_s: float) -> None:
        super().__init__(message)
        self.retry_in_s = retry_in_s


class RunnerUnauthorized(TransientRunnerError):
    """The CI service refused the runner's credentials (401, 403), or hides a build the runner
    itself created (a 404 for it and for its repository or pipeline: a token that cannot see a
    private repository gets 404, not 403, from GitHub).

    An operator must fix the token or its permissions; the build is not at fault, so it is
    polled again later (until its deadline) rather than failed. ``summary`` says what was
    refused without build ids, for /readyz.
    """

    def __init__(self, message: str, summary: str) -> None:
        super().__init__(message)
        self.summary = summary


@runtime_checkable
class BuildRunner(Protocol):
    """A CI system. Implementations are thread-safe, long-lived and restart-safe."""

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        """Start a build of ``base`` then ``head``; return promptly, the build runs on."""
        ...

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        """The build's status now; may be slow. Raises BuildNotFound or TransientRunnerError."""
        ...

    def cancel(self, build_id: BuildID) -> None:
        """Ask the runner to stop the build; returns once asked. A no-op on a terminal build."""
        ...
