"""Waiting on a condition with a deadline, never on the clock alone; and reading what another
process is still writing."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], timeout: float = 10.0, interval: float = 0.02, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy and return that value; fail at the
    deadline, saying what was awaited (``message``, else the condition)."""
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
