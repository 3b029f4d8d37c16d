"""Fixtures of the unit tests: the in-memory queue on a clock that moves only when told, and
the log captured (not rendered: a rich traceback with locals costs a second per error)."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from buildq.queue.memory import MemoryQueue
from tests.unit.doubles import ManualClock


@pytest.fixture(autouse=True)
def logs() -> Iterator[list[MutableMapping[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue(clock: ManualClock) -> MemoryQueue:
    return MemoryQueue(clock=clock)
