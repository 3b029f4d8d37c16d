"""Fixtures of the unit tests: the in-memory queue on a clock that moves only when told."""

from __future__ import annotations

import pytest

from buildq.queue.memory import MemoryQueue
from tests.unit.doubles import ManualClock


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def queue(clock: ManualClock) -> MemoryQueue:
    return MemoryQueue(clock=clock)
