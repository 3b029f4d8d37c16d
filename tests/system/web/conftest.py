"""Fixtures of the web system tests: ``buildq web`` processes, and one headless Chromium for the
whole session (the daemon and the test's view of its database come from the conftests above)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import write_config
from tests.support.web import TOKEN, TOKEN_ENV, WebProcess, require_chromium, start_chromium


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    require_chromium()
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


@pytest.fixture
def browser(chromium: Any) -> Iterator[Any]:
    """The session's browser, signed out, on a blank page. Cookies are cleared for every site
    (delete_all_cookies only clears the current page's, and cookies ignore the port: a
    session from an earlier test's server on 127.0.0.1 would be sent to this one)."""
    chromium.get("about:blank")
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})
    yield chromium
    chromium.get("about:blank")
    chromium.execute_cdp_cmd("Network.clearBrowserCookies", {})


@pytest.fixture
def web(backend_url: str, tmp_path: Path) -> Iterator[Callable[..., WebProcess]]:
    """Start ``buildq web`` on the test's database: ``web(body, token=True)``."""
    started: list[WebProcess] = []

    def _start(body: str, *, token: bool = False, name: str = "web") -> WebProcess:
        config = write_config(tmp_path / name / "config", backend_url, body)
        env = {TOKEN_ENV: TOKEN} if token else {}
        process = WebProcess(config, tmp_path / name / "web.log", env)
        started.append(process)
        return process.start()

    yield _start
    for process in started:
        process.stop()
