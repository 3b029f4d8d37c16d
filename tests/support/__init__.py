"""What the test tiers share (tests/unit, tests/integration, tests/system).

- ``waiting``: ``wait_until`` (a condition and a deadline, never a bare sleep), and reading the
  JSON lines another process is still writing.
- ``cli``: the ``buildq`` command run in this process.
- ``tables``: the queue's tables read and written around the queue (the admin tools' view).
- ``database``: the backends a test runs on, and emptying the session's MySQL database between
  tests (the fixtures themselves are in tests/conftest.py).
- ``daemon``: ``buildq run`` as a real process, and ``World``, the test's view of its database.
- ``scrape``: reading a daemon's ops endpoint as Prometheus would.
- ``runners``: a clock for the runners, and cleaning up after the command runner's builds.
- ``fakeci``: fake Buildkite, GitHub, GitLab and Jenkins services on 127.0.0.1.
- ``buildbot``: a real Buildbot master and workers, from PyPI.
- ``web``: ``buildq web`` as a process, and the system's headless Chromium.
- ``systemd``: the shipped units under ``systemd-analyze``, and sd_notify datagrams on a socket.
- ``strategies``: Hypothesis strategies for hostile input.
- ``tcp_proxy``: a TCP proxy in front of MariaDB that cuts and restores the link (an outage).
- ``shims``: host faults (a clock step, a full disk) injected inside a daemon process.
- ``plugin_example``: a runner plugin as a third party would ship it, and how tests install it.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The checkout: where docs/, buildq/ and the shipped files are.
REPO = Path(__file__).resolve().parents[2]

#: Whether this is a CI run (``CI=true``): a missing tool there is a failure, not a skip.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
