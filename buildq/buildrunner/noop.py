"""The ``noop`` runner: every build succeeds at once, and nothing is built.

For wiring checks, smoke tests and benchmarks of the queue itself, where a real or simulated
build would only add noise. Its one hard promise is that ids never repeat: not across threads,
runner instances, restarts or replicas on other hosts. The system buildq descends from kept a
counter that restarted at 1, so a restarted daemon handed out ids it had already used; here an
id is derived from the clock plus randomness and needs no state file.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from buildq.buildrunner import registry
from buildq.buildrunner.contract import BuildID, BuildMetadata, BuildNotFound, BuildStatus, Change
from buildq.config.base import Table

_PREFIX = "noop-"
_ID_PATTERN = re.compile(r"noop-[0-9]+")

# Random digits appended to the clock. A billion values per microsecond makes a collision
# between replicas (which share no state) vanishingly unlikely even under bursts.
_RANDOM_DIGITS = 9
_RANDOM_SPAN = 10**_RANDOM_DIGITS


@dataclass(frozen=True, slots=True)
class NoopConfig:
    """``[runners.<name>]`` with ``type = "noop"``: there is nothing to configure."""

    @classmethod
    def from_table(cls, table: Table) -> NoopConfig:
        table.reject_unknown()
        return cls()


class _IdSequence:
    """Numbers that grow strictly within a process and are unlikely to meet another's.

    One instance per process (not per runner) so that two runners in one process can never
    hand out the same id, however their calls interleave.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        candidate = time.time_ns() // 1000 * _RANDOM_SPAN + secrets.randbelow(_RANDOM_SPAN)
        with self._lock:
            # A burst within one microsecond, or a clock stepped back, falls back to +1: still
            # unique here, and the random low digits keep it apart from other processes.
            self._last = max(candidate, self._last + 1)
            return self._last

    def reset_after_fork(self) -> None:
        # The child must not continue the parent's +1 run: both would produce the same ids.
        self._lock = threading.Lock()
        self._last = 0


_SEQUENCE = _IdSequence()
os.register_at_fork(after_in_child=_SEQUENCE.reset_after_fork)


class NoopRunner:
    """A BuildRunner whose builds all succeed immediately, with no metadata."""

    def __init__(self, config: NoopConfig | None = None) -> None:
        self.config = config or NoopConfig()

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        return BuildID(f"{_PREFIX}{_SEQUENCE.next()}")

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        if not _ID_PATTERN.fullmatch(build_id.id):
            raise BuildNotFound(f"not a noop build id: {build_id.id!r}")
        return BuildStatus.SUCCEEDED, {}

    def cancel(self, build_id: BuildID) -> None:
        """Nothing to stop: every noop build is already finished."""


def _runner(_name: str, config: NoopConfig) -> NoopRunner:
    return NoopRunner(config)


#: Its calls never wait: the worker makes them on the thread that fetched the work.
RUNNER_KIND = registry.RunnerKind(
    "noop", NoopConfig.from_table, _runner, calls_wait=lambda _config: False
)
