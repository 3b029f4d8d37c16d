"""The CLI run in-process against each backend, and daemons run as processes.

``cli("builds", "show", X)`` runs ``buildq.cli.main`` with ``--url`` of the test's database
appended and returns the exit code, stdout and stderr.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.cli import CliResult, run_cli
from tests.support.daemon import DaemonProcess, World, write_config

Result = CliResult

Cli = Callable[..., Result]
MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str, url: bool = True) -> Result:
        result = run_cli([*argv, "--url", backend_url] if url else argv, capsys)
        assert "Traceback" not in result.err, result.err[-3000:]
        return result

    return run


@pytest.fixture
def world(backend_url: str) -> Iterator[World]:
    w = World(backend_url)
    yield w
    w.close()


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
