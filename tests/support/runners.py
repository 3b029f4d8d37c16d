"""Small test helpers shared by the runner tests."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

from buildq.buildrunner import _command_supervisor as files


class FakeClock:
    """Epoch seconds that move only when told to."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def recorded_pid(build_dir: Path, name: str) -> int | None:
    """The pid in one of a build's pid files, if written and still that process."""
    record = files.read_pid_file(build_dir / name)
    if record is None or files.process_identity(record[0]) != record[1]:
        return None
    return record[0]


def stop_command_builds(work_dir: Path) -> None:
    """Leave no process of a test's builds behind, whatever the test did to them."""
    builds = work_dir / "builds"
    if not builds.is_dir():
        return
    for build_dir in builds.iterdir():
        for name, kill in ((files.WRAPPER_PID_FILE, os.kill), (files.COMMAND_PID_FILE, os.killpg)):
            pid = recorded_pid(build_dir, name)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    kill(pid, signal.SIGKILL)
