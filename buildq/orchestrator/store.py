"""The build store contract: what controllers may read and write about builds.

Writes happen inside the queue transaction that also acks the delivery (and publishes the
next step), so a build's record and its place in the poll loop never disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.model import Build, BuildRequest


class BuildWrites(Protocol):
    """Writes bound to one open transaction."""

    def get_by_build(self, build_id: str) -> Build | None: ...

    def get_by_request(self, request_id: str) -> Build | None: ...

    def insert_triggered(self, request: BuildRequest, build_id: str, runner: str) -> bool:
        """Record that ``request`` became ``build_id`` (ACCEPTED). False if already recorded."""
        ...

    def record_poll(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        polls: int,
        next_poll_ms: int,
    ) -> None:
        """Store a non-terminal status (only if the build is not terminal) and the poll count."""
        ...

    def finish(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        failure_reason: str | None = None,
        error: str | None = None,
    ) -> Build | None:
        """Store the terminal status, write-once: the finished build, or None if it was already."""
        ...

    def fail_request(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> Build | None:
        """Fail a request (FAILED, infra) whether or not it got a build; None if already terminal."""
        ...

    def mark_cancel_sent(self, build_id: str) -> None: ...


class BuildReads(Protocol):
    def get_by_build(self, build_id: str) -> Build | None: ...

    def get_by_request(self, request_id: str) -> Build | None: ...
