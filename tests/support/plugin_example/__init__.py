"""The example runner plugin (``buildq_example_runner``) and how the tests install it.

``install`` builds and installs it with pip into a directory of its own, as a separate
distribution would be; tests put that directory on ``sys.path`` (in-process) or ``PYTHONPATH``
(for a ``buildq`` process), so the plugin is seen through its entry point and nothing else.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

SOURCE = Path(__file__).parent
DISTRIBUTION = "buildq-example-runner 0.1.0"


def install(work: Path) -> Path:
    """pip-install the plugin under ``work``; returns the directory to put on the path."""
    source, site = work / "src", work / "site"
    # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
    shutil.copytree(SOURCE, source, ignore=_not_the_plugin)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps"]
    command += ["--target", str(site), str(source)]
    subprocess.run(command, check=True, timeout=300, capture_output=True)
    return site


def _not_the_plugin(directory: str, names: list[str]) -> list[str]:
    """This module and caches are not part of the plugin's source."""
    return [
        n for n in names if n == "__pycache__" or (Path(directory) == SOURCE and n == "__init__.py")
    ]
