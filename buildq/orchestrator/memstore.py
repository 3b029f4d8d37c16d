"""An in-memory build store for tests, to pair with ``buildq.queue.memory.MemoryQueue``.

It reads and writes what ``SqlBuildStore`` and ``SqlBuildBatch`` do, with the same rules
(write-once finish, polls recorded only on a build that is not terminal), and its writes land
only if the batch they belong to commits: ``apply`` is the memory queue committer's hook. For
fast tests of the handlers' decisions, beside the tests of the SQL store on real databases.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import replace

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.buildstore import StepTx
from buildq.orchestrator.model import Build, BuildRequest, BuildState, FinishedBuild
from buildq.queue.memory import MemoryAckedStep, MemorySession


class MemoryBuildStore:
    """``BuildReads`` plus the writes of a memory batch (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._builds: dict[str, Build] = {}  # by request id

    # --- reads ------------------------------------------------------------------------------

    def states_by_build(self, build_ids: Sequence[str]) -> dict[str, BuildState]:
        wanted = set(build_ids)
        with self._lock:
            return {b.build_id: _state(b) for b in self._builds.values() if b.build_id in wanted}

    def states_by_request(self, request_ids: Sequence[str]) -> dict[str, BuildState]:
        with self._lock:
            return {r: _state(self._builds[r]) for r in request_ids if r in self._builds}

    def get_by_build(self, build_id: str) -> Build | None:
        with self._lock:
            return next((b for b in self._builds.values() if b.build_id == build_id), None)

    def get_by_request(self, request_id: str) -> Build | None:
        with self._lock:
            return self._builds.get(request_id)

    def all(self) -> list[Build]:
        with self._lock:
            return list(self._builds.values())

    def request_cancel(self, build_id: str, now_ms: int) -> bool:
        with self._lock:
            for request_id, build in self._builds.items():
                if build.build_id == build_id and not build.is_terminal:
                    if build.cancel_requested_at_ms is None:
                        self._builds[request_id] = replace(build, cancel_requested_at_ms=now_ms)
                    return True
        return False

    # --- the batch hook ---------------------------------------------------------------------

    def apply(self, session: MemorySession, steps: Sequence[MemoryAckedStep]) -> None:
        """Run the steps' effects; their writes land when the batch commits."""
        writes = MemoryBuildWrites(self, session)
        for step in steps:
            if step.effect is not None:
                step.effect(StepTx(step.outbox, writes))

    def _commit(self, staged: Mapping[str, Build]) -> None:
        with self._lock:
            self._builds.update(staged)


class MemoryBuildWrites:
    """``BuildWrites`` staged in one memory batch."""

    def __init__(self, store: MemoryBuildStore, session: MemorySession) -> None:
        self._store = store
        self._now = session.now_ms
        self._staged: dict[str, Build] = {}
        session.on_commit.append(lambda: store._commit(self._staged))

    def _by_build(self, build_id: str) -> Build | None:
        for build in self._staged.values():
            if build.build_id == build_id:
                return build
        return self._store.get_by_build(build_id)

    def insert_triggered(self, request: BuildRequest, build_id: str, runner: str) -> None:
        if request.request_id in self._staged or self._store.get_by_request(request.request_id):
            return
        self._staged[request.request_id] = Build(
            request_id=request.request_id,
            build_id=build_id,
            queue=request.queue,
            runner=runner,
            status=BuildStatus.ACCEPTED.value,
            metadata={},
            request_metadata=dict(request.metadata),
            base=list(request.base),
            head=list(request.head),
            failure_reason=None,
            error=None,
            polls=0,
            created_at_ms=self._now,
            updated_at_ms=self._now,
            finished_at_ms=None,
            next_poll_at_ms=None,
            cancel_requested_at_ms=None,
        )

    def record_poll(
        self,
        build_id: str,
        status: BuildStatus,
        metadata: Mapping[str, str],
        polls: int,
        next_poll_ms: int,
    ) -> None:
        build = self._by_build(build_id)
        if build is None or build.is_terminal:
            return
        self._staged[build.request_id] = replace(
            build,
            status=status.value,
            metadata=dict(metadata),
            polls=polls,
            next_poll_at_ms=self._now + next_poll_ms,
            updated_at_ms=self._now,
        )

    def finish(
        self,
        build: BuildState,
        status: BuildStatus,
        metadata: Mapping[str, str],
        failure_reason: str | None,
        error: str | None,
        polls: int,
    ) -> FinishedBuild | None:
        stored = self._by_build(build.build_id)
        if stored is None or stored.is_terminal:
            return None
        finished = replace(
            stored,
            status=status.value,
            metadata=dict(metadata),
            failure_reason=failure_reason,
            error=error,
            polls=polls,
            finished_at_ms=self._now,
            next_poll_at_ms=None,
            updated_at_ms=self._now,
        )
        self._staged[stored.request_id] = finished
        return finished.finished()

    def fail_request(
        self, request: BuildRequest | None, request_id: str, error: str
    ) -> FinishedBuild | None:
        stored = self._staged.get(request_id) or self._store.get_by_request(request_id)
        if stored is not None:
            if stored.build_id is None or stored.is_terminal:
                return None
            metadata = {**stored.metadata, "failure_reason": "infra"}
            return self.finish(
                _state(stored), BuildStatus.FAILED, metadata, "infra", error, stored.polls + 1
            )
        failed = Build(
            request_id=request_id,
            build_id=None,
            queue=request.queue if request else "",
            runner="",
            status=BuildStatus.FAILED.value,
            metadata={"failure_reason": "infra"},
            request_metadata=dict(request.metadata) if request else {},
            base=list(request.base) if request else [],
            head=list(request.head) if request else [],
            failure_reason="infra",
            error=error,
            polls=0,
            created_at_ms=self._now,
            updated_at_ms=self._now,
            finished_at_ms=self._now,
            next_poll_at_ms=None,
            cancel_requested_at_ms=None,
        )
        self._staged[request_id] = failed
        return failed.finished()

    def mark_cancel_sent(self, build_id: str) -> None:
        build = self._by_build(build_id)
        if build is not None:
            self._staged[build.request_id] = replace(build, cancel_sent_at_ms=self._now)


def _state(build: Build) -> BuildState:
    return BuildState(
        request_id=build.request_id,
        build_id=build.build_id or "",
        queue=build.queue,
        runner=build.runner,
        status=build.build_status,
        metadata_json=json.dumps(dict(build.metadata)),
        polls=build.polls,
        created_at_ms=build.created_at_ms,
        cancel_requested_at_ms=build.cancel_requested_at_ms,
        cancel_sent_at_ms=build.cancel_sent_at_ms,
    )
