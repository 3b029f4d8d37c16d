from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.daemon import DaemonProcess, write_config


@pytest.fixture
def daemon(backend_url: str, tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def _make(body: str, env: dict[str, str] | None = None, name: str = "d0") -> DaemonProcess:
        config = write_config(tmp_path / name / "config", backend_url, body)
        log_dir = tmp_path / name
        proc = DaemonProcess(config, log_dir, env or {})
        started.append(proc)
        return proc

    yield _make
    for proc in started:
        proc.cleanup()
