"""Fixtures of the system tests: ``buildq run`` as real processes on the test's database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, MakeDaemon, write_config


@pytest.fixture
def daemon(backend_url: str, tmp_path: Path) -> Iterator[MakeDaemon]:
    """``daemon(body, env=None, url=None)``: a daemon with ``body``'s runners and queues, on the
    test's database (or ``url``), in a directory of its own; started by ``.start()``, killed
    at the end of the test if still running."""
    started: list[DaemonProcess] = []

    def _make(
        body: str, env: dict[str, str] | None = None, url: str | None = None
    ) -> DaemonProcess:
        name = f"d{len(started)}"
        config = write_config(tmp_path / name / "config", url or backend_url, body)
        proc = DaemonProcess(config, tmp_path / name, env or {})
        started.append(proc)
        return proc

    yield _make
    for proc in started:
        proc.cleanup()
