"""Value types of the orchestrator: build requests, stored builds, results."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from buildq.buildrunner import BuildStatus, Change, MalformedPayload
from buildq.buildrunner.contract import decode_json_object
from buildq.queue.contract import Message, message_id
from buildq.storage.columns import QUEUE_NAME_MAX

#: Most changes one request may carry (base + head): a bound on payload and runner input.
MAX_CHANGES = 1_000
MAX_FIELD_CHARS = 191


@dataclass(frozen=True)
class BuildRequest:
    """What a caller asks for: build ``base`` then ``head`` on ``queue``."""

    request_id: str
    queue: str
    base: tuple[Change, ...]
    head: tuple[Change, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "request_id": self.request_id,
                "queue": self.queue,
                "base": [c.to_json() for c in self.base],
                "head": [c.to_json() for c in self.head],
                "metadata": dict(self.metadata),
            },
            ensure_ascii=False,
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> BuildRequest:
        doc = decode_json_object(raw, "build request")
        request_id = _short_str(doc, "request_id", MAX_FIELD_CHARS)
        queue = _short_str(doc, "queue", QUEUE_NAME_MAX)
        base = _changes(doc.get("base", []), "base")
        head = _changes(doc.get("head"), "head")
        if not head:
            raise MalformedPayload("build request needs at least one change in 'head'")
        if len(base) + len(head) > MAX_CHANGES:
            raise MalformedPayload(f"build request has more than {MAX_CHANGES} changes")
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise MalformedPayload("build request 'metadata' must map strings to strings")
        return cls(request_id, queue, base, head, metadata)


def _short_str(doc: Mapping[str, Any], key: str, limit: int) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise MalformedPayload(f"'{key}' must be a string of 1 to {limit} characters")
    return value


def _changes(value: object, key: str) -> tuple[Change, ...]:
    if not isinstance(value, list):
        raise MalformedPayload(f"'{key}' must be a list of changes")
    return tuple(Change.from_json(item) for item in value)


@dataclass(frozen=True)
class Build:
    """A build as the orchestrator stores it."""

    request_id: str
    build_id: str | None  # None until the runner accepted it
    queue: str
    runner: str
    status: str  # a BuildStatus value
    metadata: Mapping[str, str]
    request_metadata: Mapping[str, str]
    base: Sequence[Change]
    head: Sequence[Change]
    failure_reason: str | None
    error: str | None
    polls: int
    created_at_ms: int
    updated_at_ms: int
    finished_at_ms: int | None
    next_poll_at_ms: int | None
    cancel_requested_at_ms: int | None
    cancel_sent_at_ms: int | None = None

    @property
    def build_status(self) -> BuildStatus:
        return BuildStatus(self.status)

    @property
    def is_terminal(self) -> bool:
        return self.build_status.is_terminal

    def finished(self) -> FinishedBuild:
        """What a result says of this (terminal) build."""
        return FinishedBuild(
            request_id=self.request_id,
            build_id=self.build_id,
            queue=self.queue,
            status=self.status,
            failure_reason=self.failure_reason,
            error=self.error,
            metadata=self.metadata,
            polls=self.polls,
            created_at_ms=self.created_at_ms,
            finished_at_ms=self.finished_at_ms or 0,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "build_id": self.build_id,
            "queue": self.queue,
            "runner": self.runner,
            "status": self.status,
            "metadata": dict(self.metadata),
            "request_metadata": dict(self.request_metadata),
            "base": [c.to_json() for c in self.base],
            "head": [c.to_json() for c in self.head],
            "failure_reason": self.failure_reason,
            "error": self.error,
            "polls": self.polls,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
            "finished_at_ms": self.finished_at_ms,
            "next_poll_at_ms": self.next_poll_at_ms,
            "cancel_requested_at_ms": self.cancel_requested_at_ms,
            "cancel_sent_at_ms": self.cancel_sent_at_ms,
        }


@dataclass(frozen=True, slots=True)
class BuildState:
    """What the poll loop needs of a stored build: read for a whole batch in one query,
    without the request body (its changes and metadata)."""

    request_id: str
    build_id: str
    queue: str
    runner: str
    status: BuildStatus
    #: The last metadata the runner gave, as stored: read only by the rare paths that keep
    #: it (a timeout, a dead letter), so a poll does not parse it.
    metadata_json: str
    polls: int
    created_at_ms: int
    cancel_requested_at_ms: int | None
    cancel_sent_at_ms: int | None

    @property
    def is_terminal(self) -> bool:
        return self.status.is_terminal

    @property
    def metadata(self) -> dict[str, str]:
        value = json.loads(self.metadata_json or "{}")
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True, slots=True)
class FinishedBuild:
    """A build as its result reports it."""

    request_id: str
    build_id: str | None
    queue: str
    status: str
    failure_reason: str | None
    error: str | None
    metadata: Mapping[str, str]
    polls: int
    created_at_ms: int
    finished_at_ms: int


def request_message(request: BuildRequest) -> Message:
    """The ``build`` topic message for a request: idempotent on the request id."""
    return Message(
        id=message_id(request.request_id, "request"),
        payload=request.to_bytes(),
        partition_key=request.request_id,
    )


def result_payload(build: FinishedBuild) -> bytes:
    """The ``buildresult`` message for a finished build."""
    return json.dumps(
        {
            "request_id": build.request_id,
            "build_id": build.build_id,
            "queue": build.queue,
            "status": build.status,
            "failure_reason": build.failure_reason,
            "error": build.error,
            "metadata": dict(build.metadata),
            "finished_at_ms": build.finished_at_ms,
        },
        ensure_ascii=False,
    ).encode()
