"""The one warning these tests may leave: a command runner's supervisors outliving it.

The command runner starts each build under a supervisor in its own session, which must outlive
the runner (and the daemon: docs/runners.md). A runner object dropped while its supervisors run,
or before it reaped the ones a test killed, makes ``Popen.__del__`` warn "subprocess N is still
running". That is the design, not a leak (``stop_command_builds`` ends every build a test
started), so it is exempt here, and only here; runners in reference cycles are collected at
the end of each test, under the exemption, rather than during a later, unrelated one.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

SUPERVISOR_OUTLIVES_RUNNER = r"ignore:subprocess \d+ is still running:ResourceWarning"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.path.parent.name == "buildrunner":
            item.add_marker(pytest.mark.filterwarnings(SUPERVISOR_OUTLIVES_RUNNER))


@pytest.fixture(autouse=True)
def _collect_dropped_runners() -> Iterator[None]:
    yield
    gc.collect()
