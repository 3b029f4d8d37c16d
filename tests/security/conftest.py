"""The CLI run in-process against each backend, and daemons run as processes.

``cli("builds", "show", X)`` runs ``buildq.cli.main`` with ``--url`` of the test's database
appended and returns the exit code, stdout and stderr.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from buildq.cli import main
from tests.e2e.harness import DaemonProcess, World, write_config


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def data(self) -> Any:
        return json.loads(self.out)

    def refused_cleanly(self) -> bool:
        """Exit 1 or 2 with one ``buildq: …`` line on stderr and no traceback."""
        lines = self.err.strip().splitlines()
        return (
            self.code in (1, 2)
            and len(lines) == 1
            and lines[0].startswith("buildq: ")
            and "Traceback" not in self.err
        )


Cli = Callable[..., Result]
MakeDaemon = Callable[..., DaemonProcess]


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str]) -> Cli:
    def run(*argv: str, url: bool = True) -> Result:
        args = [*argv, "--url", backend_url] if url else list(argv)
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as exit_:  # argparse usage errors
            code = int(exit_.code or 0)
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err, captured.err[-3000:]
        return Result(code, captured.out, captured.err)

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
