"""The bounded chaos run (a couple of minutes) on MariaDB: ``make chaos`` runs the full one.

Three ``buildq run`` processes share one database through a TCP proxy; while builds flow,
daemons are SIGKILLed and restarted, one is SIGSTOPped past its lease, the proxy cuts the
database away for a while, one queue's runner fails every status call for a while, the
database refuses every daemon's writes for a while (a full disk), and one daemon's wall clock
jumps two hours ahead. See tests/system/chaos/audit.py for the invariants and docs/reliability.md
for the guarantees.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import pytest

from tests.system.chaos.profiles import BOUNDED
from tests.system.chaos.run import execute

pytestmark = [pytest.mark.mysql, pytest.mark.slow, pytest.mark.timeout(600)]


def test_bounded_chaos_run_loses_duplicates_and_forks_nothing(
    mysql_server_url: str, tmp_path: Path
) -> None:
    seed = int(os.environ.get("BUILDQ_CHAOS_SEED", secrets.randbelow(1_000_000)))
    summary = execute(BOUNDED, mysql_server_url, tmp_path, seed, keep=False)
    print(summary)
    assert " lost=0 duplicated=0 forked=0 " in summary
