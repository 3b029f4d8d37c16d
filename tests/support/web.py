"""``buildq web`` as a real process, and the system's Chromium driven by Selenium.

Chromium and its driver come from Debian (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them). Selenium is pointed at both binaries and kept offline, so no test
ever downloads a browser or a driver of its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import IN_CI
from tests.support.daemon import BUILDQ
from tests.support.waiting import wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN_ENV = "BUILDQ_TEST_WEB_TOKEN"
TOKEN = "web-test-token-0f3c9a71d2e84b56"

#: The daemon's runner and queues: ``main`` builds finish in seconds (some fail), ``slow``
#: builds run for ten minutes (something to cancel).
SIM = """
[runners.sim]
type = "sim"
accepted_s = 0.3
accepted_max_s = 0.8
running_s = 1.0
running_max_s = 2.5
failure_probability = 0.3
seed = 11
state_dir = "{state}"

[runners.sim.queues.slow]
running_s = 600.0

[poll]
accepted_interval_s = 0.3
running_interval_s = 0.4
growth = 1.1
max_interval_s = 0.6
jitter = 0.2

[queues.main]
runner = "sim"

[queues.slow]
runner = "sim"
"""


def web_table(*, token: bool) -> str:
    table = '\n[web]\nport = 0\nrefresh_s = 1\nallowed_hosts = ["127.0.0.1"]\n'
    return table + (f'token_env = "{TOKEN_ENV}"\n' if token else "")


@dataclass
class WebProcess:
    """``buildq web --config CONFIG``, its JSON log in ``log``."""

    config: Path
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> WebProcess:
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [BUILDQ, "web", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        process = self.process
        wait_until(
            lambda: self._listening() or process.poll() is not None,
            timeout=30,
            message="buildq web listening",
        )
        assert process.poll() is None, self.log.read_text(errors="replace")
        return self

    @property
    def url(self) -> str:
        found = self._listening()
        assert found, self.log.read_text(errors="replace")
        return found

    def _listening(self) -> str | None:
        for event in self.events():
            if event.get("event") == "web_listening":
                return str(event["url"])
        return None

    def events(self) -> list[dict[str, Any]]:
        """The log's JSON lines; a line still being written is skipped, not an error."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def stop(self) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
            raise


def require_chromium() -> None:
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if shutil.which(path) is None]
    if missing:
        reason = (
            f"{', '.join(missing)} not installed (Debian: apt-get install chromium chromium-driver)"
        )
        if IN_CI:
            pytest.fail(f"{reason}, but CI=true: .ci/run installs them")
        pytest.skip(reason)


def start_chromium(profile: Path) -> Any:
    """Headless Chromium with a fresh profile, through the system's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    # With both paths given Selenium Manager has nothing to find; offline it could not
    # download anything even if it tried.
    os.environ["SE_OFFLINE"] = "true"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    return driver
