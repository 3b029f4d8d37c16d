"""What CI runs (issue 15, item 10): lint as well as the tests, and a warning fails its test."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from tests.support import REPO


def test_ci_runs_lint_before_the_tests() -> None:
    commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("make ")
    ]
    assert commands == ["make lint", "make test"]


def test_a_warning_fails_the_test_that_caused_it(tmp_path: Path) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["tool"]["pytest"]["ini_options"]["filterwarnings"][0] == "error"
    test = tmp_path / "test_warns.py"
    test.write_text(
        "import warnings\n\ndef test_x():\n    warnings.warn('deprecated', UserWarning)\n"
    )
    config = ["-c", str(REPO / "pyproject.toml"), "--rootdir", str(tmp_path)]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *config, str(test)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert "UserWarning: deprecated" in done.stdout
