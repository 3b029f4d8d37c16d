"""Helpers for tests: wait on a condition with a deadline instead of sleeping; run the CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from buildq.cli import main

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or condition}")
        time.sleep(interval)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects in a file another process is appending to, one per line.

    Only complete lines count: the writer may be mid-line (a line is not written atomically,
    and a loaded machine makes the gap long enough to be read). Lines that are not JSON
    objects (a traceback, a plain-text error) are skipped.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.split(b"\n")[:-1]:  # the last piece is empty or still being written
        if not line.startswith(b"{"):
            continue
        try:
            value = json.loads(line)
        except ValueError:
            continue
        if isinstance(value, dict):
            out.append(value)
    return out


@dataclass
class CliResult:
    """What one in-process ``buildq`` run printed and returned."""

    code: int
    out: str
    err: str

    @property
    def data(self) -> Any:
        try:
            return json.loads(self.out)
        except ValueError:
            raise AssertionError(
                f"not JSON (exit {self.code}): {self.out!r} {self.err!r}"
            ) from None

    def refused_cleanly(self) -> bool:
        """Exit 1 or 2 with one ``buildq: …`` line on stderr and no traceback."""
        lines = self.err.strip().splitlines()
        return (
            self.code in (1, 2)
            and len(lines) == 1
            and lines[0].startswith("buildq: ")
            and "Traceback" not in self.err
        )


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """``buildq ARGV`` in this process; argparse's usage errors become their exit code."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
