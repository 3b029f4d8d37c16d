"""Faults of a daemon's host, injected inside the daemon process: a wall-clock step and a full
disk. ``sitecustomize.py`` here does the injecting (its docstring says how); ``env`` is the
environment that puts it under a daemon. Used by tests/system/e2e/test_storage_faults.py and
the chaos run (tests/system/chaos/faults.py).
"""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.shims.sitecustomize import CLOCK_STEP_EXEMPT, CLOCK_STEP_FILE, DISK_FULL_FILE

#: The directory to put on a daemon's PYTHONPATH (it holds sitecustomize.py).
SHIMS_DIR = Path(__file__).resolve().parent
#: Modules whose wall clock is never stepped: the ``sim`` runner plays a CI service, whose
#: clock is its own host's, not the stepped daemon's.
SIM_RUNNER = "buildq.buildrunner.sim"


def env(
    *,
    clock_step_file: Path | None = None,
    clock_step_exempt: tuple[str, ...] = (),
    disk_full_file: Path | None = None,
) -> dict[str, str]:
    """Environment variables for a daemon process with the shims on: its wall clock moves by
    the seconds ``clock_step_file`` holds, and its writes fail while ``disk_full_file`` exists.
    """
    out = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(SHIMS_DIR), os.environ.get("PYTHONPATH")]))
    }
    if clock_step_file is not None:
        out[CLOCK_STEP_FILE] = str(clock_step_file)
        out[CLOCK_STEP_EXEMPT] = ",".join(clock_step_exempt)
    if disk_full_file is not None:
        out[DISK_FULL_FILE] = str(disk_full_file)
    return out
