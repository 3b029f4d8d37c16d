"""Daemons run as processes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, MakeDaemon, write_config


@pytest.fixture
def daemon(backend_url: str, tmp_path: Path) -> Iterator[MakeDaemon]:
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
