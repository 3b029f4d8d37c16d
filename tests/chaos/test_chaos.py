"""The bounded chaos run (a couple of minutes) on MariaDB: ``make chaos`` runs the full one.

Three ``buildq run`` processes share one database through a TCP proxy; while builds flow,
daemons are SIGKILLed and restarted, one is SIGSTOPped past its lease, the proxy cuts the
database away for a while, and one queue's runner fails every status call for a while.
See tests/chaos/audit.py for the invariants and docs/reliability.md for the guarantees.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.chaos.run import BOUNDED, execute

pytestmark = [pytest.mark.mysql, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bounded_chaos_run_loses_duplicates_and_forks_nothing(
    mysql_server_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("BUILDQ_CHAOS_SEED", secrets.randbelow(1_000_000)))
    summary = execute(BOUNDED, mysql_server_url, tmp_path, seed, keep=False)
    print(summary)
    assert " lost=0 duplicated=0 forked=0 " in summary
