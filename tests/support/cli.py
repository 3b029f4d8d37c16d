"""The ``buildq`` command run in this process, and what it printed."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from buildq.cli import main


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


#: The ``cli`` fixture: ``cli(*argv)`` runs ``buildq ARGV --url <the test's database>``.
Cli = Callable[..., CliResult]


def run_cli(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> CliResult:
    """``buildq ARGV`` in this process; argparse's usage errors become their exit code."""
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
