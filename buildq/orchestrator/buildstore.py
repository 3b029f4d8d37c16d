"""The build store contract: what controllers may read and write about builds.

Reads happen when a batch of deliveries is planned (one query for the batch). Writes happen
inside the transaction that also settles the step's delivery (and publishes its next step), so
a build's record and its place in the poll loop never disagree. ``buildq.orchestrator.sqlstore``
and ``sqlbatch`` implement it on SQL, ``memstore`` in memory for tests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.model import Build, BuildRequest, BuildState, FinishedBuild
from buildq.queue.contract import Effect, Outbox


class BuildWrites(Protocol):
    """The writes of one step, in its batch's transaction."""

    def insert_triggered(self, request: BuildRequest, build_id: str, runner: str) -> None:
        """Record that ``request`` became ``build_id`` (ACCEPTED); a no-op if it already did."""
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
        build: BuildState,
        status: BuildStatus,
        metadata: Mapping[str, str],
        failure_reason: str | None,
        error: str | None,
        polls: int,
    ) -> FinishedBuild | None:
        """Store the terminal status, write-once: the finished build to publish, or None if
        it was finished already (then nothing may be published for it)."""
        ...

    def fail_request(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> FinishedBuild | None:
        """Fail a request (FAILED, infra) whether or not it got a build; None if already terminal."""
        ...

    def mark_cancel_sent(self, build_id: str) -> None: ...


class BuildReads(Protocol):
    """What planning reads: one query per batch."""

    def states_by_build(self, build_ids: Sequence[str]) -> dict[str, BuildState]: ...

    def states_by_request(self, request_ids: Sequence[str]) -> dict[str, BuildState]:
        """Stored requests among these (a request that failed before it got a build has
        ``build_id`` '')."""
        ...

    def get_by_build(self, build_id: str) -> Build | None: ...


class AckedEffect(Protocol):
    """An acked step as a store's batch hook (``apply``) sees it: the queue backend's
    ``AckedStep``, read through this so the build store never imports that backend."""

    @property
    def effect(self) -> Effect | None: ...

    @property
    def outbox(self) -> Outbox: ...


@dataclass(slots=True)
class StepTx:
    """What an effect may touch: the step's outbox and the build store, in one transaction."""

    queue: Outbox
    builds: BuildWrites


class BatchConflict(Exception):
    """A batched write found the database other than the batch's reads said (a build
    finished meanwhile): nothing is written, and the batch is split so that each step
    decides again on its own."""
