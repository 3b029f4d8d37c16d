"""Running the admin CLI in-process against each backend (snapshots of the queue tables are in
tests/support/tables.py).

``cli("queue", "topics", "--json")`` runs ``buildq.cli.main`` with ``--url`` of the test's
database appended, returns exit code, stdout, stderr and (for ``--json``) the parsed output.
Unlike tests/conftest.py's ``cli`` it can answer the confirmation prompt (``stdin=``), and
what the command prints on stderr is the test's to judge.
"""

from __future__ import annotations

import io

import pytest

from tests.support.cli import Cli, CliResult, run_cli

Result = CliResult


class Terminal(io.StringIO):
    """A stdin that says it is a TTY, answering the confirmation prompt with ``answer``."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def cli(backend_url: str, capsys: pytest.CaptureFixture[str], monkeypatch) -> Cli:
    def run(*argv: str, stdin: io.StringIO | None = None, url: bool = True) -> Result:
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", stdin)
        return run_cli([*argv, "--url", backend_url] if url else argv, capsys)

    return run
