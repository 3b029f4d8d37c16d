"""The webhook re-wake: a signed CI event polls its build now, through its one pending poll.

The pending delayed poll is made due (``expedite``) instead of publishing a second one, so a
webhook never forks a build's poll chain. When the poll is in flight instead (it may have read
the state before the event), the poll it schedules next is expedited, for as long as a
delivery may stay in flight: a thread tries every 100 ms.
"""

from __future__ import annotations

import threading
import time

import structlog

from buildq.buildrunner import BuildID
from buildq.orchestrator import topics
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.sql import SqlQueue
from buildq.storage.errors import first_line

log = structlog.get_logger("buildq.daemon")

#: How often builds woken while their poll was in flight are expedited again.
_REWAKE_INTERVAL_S = 0.1


class WebhookRewake:
    def __init__(self, queue: SqlQueue, store: SqlBuildStore, in_flight_ms: int) -> None:
        """``in_flight_ms``: how long a poll may stay in flight (the buildsignal topic's
        visibility timeout)."""
        self.queue = queue
        self.store = store
        self.in_flight_ms = in_flight_ms
        self._rewake: dict[str, float] = {}  # build id -> give up at (monotonic s)
        self._lock = threading.Lock()

    def on_build_event(self, runner_name: str, build_id: BuildID) -> None:
        """A signed CI event: poll that build now. Builds we did not trigger are ignored."""
        build = self.store.get_by_build(build_id.id)
        if build is None or build.is_terminal or build.runner != runner_name:
            log.debug("webhook_event_ignored", build_id=build_id.id, runner=runner_name)
            return
        woken = self.queue.expedite(topics.BUILDSIGNAL, build_id.id)
        log.info("webhook_event", build_id=build_id.id, runner=runner_name, expedited=woken)
        if not woken:
            # The poll is in flight and may have read the state before this event: expedite
            # the poll it schedules next, for as long as a delivery may stay in flight.
            with self._lock:
                self._rewake[build_id.id] = time.monotonic() + self.in_flight_ms / 1000

    def run(self, stopping: threading.Event) -> None:
        """Expedite the next poll of builds woken while their poll was in flight."""
        while not stopping.wait(_REWAKE_INTERVAL_S):
            with self._lock:
                pending = list(self._rewake.items())
            for build_id, give_up_at in pending:
                try:
                    woken = self.queue.expedite(topics.BUILDSIGNAL, build_id)
                    # The poll in flight may have been the last one: a finished build has no
                    # next poll to wake, so stop now instead of trying until the timeout.
                    done = not woken and self._finished(build_id)
                except Exception as err:  # the safety poll still comes
                    log.warning("webhook_rewake_failed", build_id=build_id, error=first_line(err))
                    woken, done = 0, False
                if woken or done or time.monotonic() >= give_up_at:
                    with self._lock:
                        self._rewake.pop(build_id, None)
                    log.info("webhook_rewake", build_id=build_id, expedited=woken)

    def _finished(self, build_id: str) -> bool:
        build = self.store.get_by_build(build_id)
        return build is None or build.is_terminal
