"""Builds for programs that embed buildq: submit, cancel, get, list and follow.

What ``buildq submit``, ``buildq cancel`` and ``buildq builds`` do, over the database a daemon
works on (README.md, "Embedding buildq"). A submitted request is a message on the ``build``
topic, idempotent on its request id; the daemon triggers it and polls the build to a terminal
state, and its row in the build store says where it is. A cancel is recorded on that row and
the build's poll made due now: the poll loop tells the runner.

The ``buildq`` command, ``python -m buildq.demo`` and the status page's cancel go through here.
"""

from __future__ import annotations

import enum
import secrets
import time
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

from buildq.buildrunner import Change
from buildq.orchestrator import topics
from buildq.orchestrator.model import Build, BuildRequest, request_message
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database, create_engine

__all__ = [
    "Build",
    "BuildRequest",
    "Builds",
    "CancelOutcome",
    "Cancellation",
    "InvalidRequest",
    "Submitted",
    "new_request",
    "validate",
]


class InvalidRequest(ValueError):
    """A request the daemon would refuse, in one line. ``field`` names the argument at fault
    (``head``, ``base``) when the problem is one of its changes, and ``reason`` is the rest."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.reason = reason
        self.field = field


def new_request(
    queue: str,
    head: Iterable[Change | str],
    base: Iterable[Change | str] = (),
    *,
    metadata: Mapping[str, str] | None = None,
    request_id: str | None = None,
    queues: Collection[str] | None = None,
) -> BuildRequest:
    """A request to build ``base`` then ``head`` on ``queue``, checked as the daemon will
    check it (``validate``). Changes are ``Change`` objects or ``ID[@REV]`` strings; the
    request id defaults to a random one."""
    request = BuildRequest(
        request_id=f"req-{secrets.token_hex(8)}" if request_id is None else request_id,
        queue=queue,
        base=_changes(base, "base"),
        head=_changes(head, "head"),
        metadata=dict(metadata or {}),
    )
    validate(request, queues)
    return request


def _changes(specs: Iterable[Change | str], field: str) -> tuple[Change, ...]:
    try:
        return tuple(s if isinstance(s, Change) else Change.parse(s) for s in specs)
    except ValueError as err:
        raise InvalidRequest(str(err), field) from None


def validate(request: BuildRequest, queues: Collection[str] | None = None) -> None:
    """InvalidRequest unless the daemon would accept ``request``: its own decoding of the
    message, and (given the configured ``queues``) a queue it knows."""
    try:
        BuildRequest.from_bytes(request.to_bytes())
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if queues is not None and request.queue not in queues:
        known = ", ".join(sorted(queues)) or "none"
        raise InvalidRequest(f"unknown queue {request.queue!r} (configured: {known})")


@dataclass(frozen=True, slots=True)
class Submitted:
    request: BuildRequest
    #: A request with this id was submitted before: nothing new was queued.
    duplicate: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


class CancelOutcome(enum.StrEnum):
    REQUESTED = "requested"
    ALREADY_FINISHED = "already_finished"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class Cancellation:
    outcome: CancelOutcome
    #: The build as last read (None when there is no such build).
    build: Build | None


class Builds:
    """Submit, cancel and read the builds of one buildq database. Thread-safe.

    ``queues``, when given (a daemon config's ``queues``), makes ``submit`` refuse a request
    for any other queue; without it the daemon fails such a request when it reads it.
    """

    def __init__(self, db: Database, *, queues: Collection[str] | None = None) -> None:
        self.db = db
        self.queues = queues
        #: The reads go through it; views that need more (``buildq watch``) may use it too.
        self.store = SqlBuildStore(db)
        self._queue = SqlQueue(db)
        self._owns_db = False

    @classmethod
    def open(
        cls, url: str, *, queues: Collection[str] | None = None, retry_for_s: float = 5.0
    ) -> Builds:
        """Connect to the database at ``url`` (never creating it: ``buildq db upgrade`` does);
        ``close`` disconnects. ``retry_for_s``: how long a call waits out an unavailable
        database before raising ``buildq.queue.QueueError``."""
        db = Database(create_engine(url, pool_size=2), retry_for_s=retry_for_s)
        builds = cls(db, queues=queues)
        builds._owns_db = True
        return builds

    def close(self) -> None:
        """Disconnect, if ``open`` connected; a ``Database`` given stays the caller's."""
        if self._owns_db:
            self.db.dispose()

    def __enter__(self) -> Builds:
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self.close()

    def submit(self, request: BuildRequest) -> Submitted:
        """Queue ``request`` (from ``new_request``) for the daemon; submitting the same request
        id again queues nothing (``duplicate``)."""
        validate(request, self.queues)
        result = self._queue.publish(topics.BUILD, request_message(request))
        return Submitted(request, result.duplicate)

    def cancel(self, ident: str) -> Cancellation:
        """Ask for the cancellation of a build, by build id or request id."""
        build = self.store.get(ident)
        if build is None:
            return Cancellation(CancelOutcome.NOT_FOUND, None)
        if build.is_terminal or build.build_id is None:
            return Cancellation(CancelOutcome.ALREADY_FINISHED, build)
        if not self.store.request_cancel(build.build_id):
            # It finished between the read and the request: say how, as it is now.
            return Cancellation(CancelOutcome.ALREADY_FINISHED, self.store.get(ident) or build)
        # Wake the build's poll now, so the cancel reaches the runner without waiting for it.
        self._queue.expedite(topics.BUILDSIGNAL, build.build_id)
        return Cancellation(CancelOutcome.REQUESTED, build)

    def get(self, ident: str) -> Build | None:
        """A build by build id or request id; None if there is none."""
        return self.store.get(ident)

    def list(
        self, statuses: Sequence[str] | None = None, *, queue: str | None = None, limit: int = 100
    ) -> Sequence[Build]:
        """Builds newest first, at most ``limit``, of these statuses (BuildStatus values) and
        this queue when given."""
        return self.store.list_builds(statuses, limit, queue)

    def follow(
        self, request_id: str, *, timeout_s: float | None = None, interval_s: float = 0.2
    ) -> Iterator[Build]:
        """The request's build each time its status or build id changes, ending with the
        terminal one; TimeoutError if it is not terminal within ``timeout_s``."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = None
        while True:
            build = self.store.get_by_request(request_id)
            if build is not None and (build.status, build.build_id) != last:
                last = (build.status, build.build_id)
                yield build
            if build is not None and build.is_terminal:
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"gave up waiting for {request_id} after {timeout_s:g}s")
            time.sleep(interval_s)
