"""The status page in a real headless Chromium, against a real daemon running sim builds."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By

from buildq.buildrunner import Change
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest, request_message
from tests.support.waiting import wait_until
from tests.support.web import SIM, TOKEN, web_table

pytestmark = pytest.mark.slow

#: Set to a directory to keep the overview's screenshot there (docs/images for the README).
SCREENSHOT_DIR_ENV = "BUILDQ_WEB_SCREENSHOT_DIR"
HOSTILE_ID = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


def sim(tmp_path: Path) -> str:
    return SIM.format(state=tmp_path / "sim")


def ids_in(browser: Any, table: str) -> list[str]:
    """Request ids in a table of the current page, as the DOM has them right now."""
    return browser.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))"
        ".map(function (row) { return row.dataset.requestId; });",
        f"#{table}",
    )


def text_of(browser: Any, css: str) -> str:
    return str(
        browser.execute_script("return document.querySelector(arguments[0]).textContent;", css)
    )


def submit(world: Any, queue: str, request_id: str, head: str = "change-1") -> None:
    request = BuildRequest(request_id, queue, (Change("base-1", "b1"),), (Change(head, "r1"),))
    world.queue.publish(topics.BUILD, request_message(request))


def test_builds_appear_in_flight_and_move_to_results_without_a_reload(
    daemon, world, web, browser, tmp_path
):
    daemon(sim(tmp_path)).start()
    page = web(sim(tmp_path) + web_table(token=False))
    browser.get(page.url + "builds")
    # A mark on this document: it is gone if anything reloads the page.
    browser.execute_script("window.__sameDocument = true;")

    requests = world.submit("main", 5, prefix="web")
    submit(world, "slow", "web-slow")
    wait_until(
        lambda: (
            {*requests, "web-slow"}
            <= {*ids_in(browser, "live-table"), *ids_in(browser, "results-table")}
        ),
        timeout=60,
        message="submitted builds on the page",
    )
    wait_until(
        lambda: (
            set(requests) <= set(ids_in(browser, "results-table"))
            and not set(requests) & set(ids_in(browser, "live-table"))
        ),
        timeout=90,
        message="builds moved to the results",
    )
    assert "web-slow" in ids_in(browser, "live-table")
    assert browser.execute_script("return window.__sameDocument === true;")
    statuses = {row.status for row in world.builds() if row.request_id in requests}
    assert statuses <= {"SUCCEEDED", "FAILED"}

    browser.get(page.url + "build?id=" + requests[0])
    events = browser.execute_script(
        "return Array.from(document.querySelectorAll('#timeline tbody tr'))"
        ".map(function (row) { return row.dataset.event; });"
    )
    assert events[0] == "submitted" and "triggered" in events and "finished" in events
    assert events.count("polled") >= 2, events
    assert "result published" in events
    assert '"request_id": "web-0"' in text_of(browser, "#result-message")

    browser.get(page.url)
    wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#queues tr[data-queue='main']"))
    main = text_of(browser, "#queues tr[data-queue='main']")
    assert "main" in main and "sim" in main
    _screenshot(browser, tmp_path)


def _screenshot(browser: Any, tmp_path: Path) -> None:
    """The overview, for the test's record and (when asked) for the README."""
    path = tmp_path / "web-overview.png"
    assert browser.save_screenshot(str(path))
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(keep) / path.name)


def test_cancel_works_with_the_token_and_is_refused_without(daemon, world, web, browser, tmp_path):
    daemon(sim(tmp_path)).start()
    guarded = web(sim(tmp_path) + web_table(token=True), token=True, name="guarded")
    open_ = web(sim(tmp_path) + web_table(token=False), name="open")
    submit(world, "slow", "to-cancel")
    submit(world, "slow", "to-keep")
    wait_until(lambda: len([b for b in world.builds() if b.build_id]) == 2, timeout=60)

    # Without a token configured: no cancel button, and a hand-made POST is refused.
    browser.get(open_.url + "build?id=to-keep")
    assert not browser.find_elements(By.ID, "cancel")
    assert "Actions are off" in text_of(browser, "main")
    status = browser.execute_script(
        "return fetch('cancel', {method: 'POST', body: new URLSearchParams({id: 'to-keep', csrf: 'x'})})"
        ".then(function (r) { return r.status; });"
    )
    assert status == 403
    assert any(e.get("event") == "web_action_refused" for e in open_.events())

    # With a token, but not signed in: refused too.
    browser.get(guarded.url + "build?id=to-keep")
    assert not browser.find_elements(By.ID, "cancel")
    status = browser.execute_script(
        "return fetch('cancel', {method: 'POST', body: new URLSearchParams({id: 'to-keep', csrf: 'x'})})"
        ".then(function (r) { return r.status; });"
    )
    assert status == 403

    # Signed in with the token: the button cancels, and the page follows the build to CANCELLED.
    browser.get(guarded.url + "login?next=" + "build%3Fid%3Dto-cancel")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "login").click()
    wait_until(lambda: browser.find_elements(By.ID, "cancel"), timeout=20, message="cancel button")
    browser.find_element(By.ID, "cancel").click()
    browser.switch_to.alert.accept()
    wait_until(
        lambda: text_of(browser, "#status") == "CANCELLED",
        timeout=60,
        message="page shows CANCELLED",
    )
    builds = {b.request_id: b for b in world.builds()}
    assert builds["to-cancel"].status == "CANCELLED"
    assert builds["to-keep"].status == "RUNNING" and builds["to-keep"].cancel_requested_at is None
    [action] = [e for e in guarded.events() if e.get("event") == "web_action"]
    assert (action["action"], action["id"], action["outcome"]) == (
        "cancel",
        "to-cancel",
        "requested",
    )
    log = guarded.log.read_text() + open_.log.read_text()
    assert TOKEN not in log


def test_a_hostile_request_id_is_shown_as_text(daemon, world, web, browser, tmp_path):
    daemon(sim(tmp_path)).start()
    page = web(sim(tmp_path) + web_table(token=False))
    submit(world, "main", HOSTILE_ID, head="<b>bold</b>")

    browser.get(page.url + "builds?q=" + "%3Cscript")
    wait_until(
        lambda: HOSTILE_ID in ids_in(browser, "live-table") + ids_in(browser, "results-table"),
        timeout=60,
        message="the hostile build on the builds page",
    )
    browser.find_element(By.LINK_TEXT, HOSTILE_ID).click()
    wait_until(lambda: browser.find_elements(By.ID, "request-id"))
    assert text_of(browser, "#request-id") == HOSTILE_ID
    assert "<b>bold</b>" in text_of(browser, "#changes-head")
    for _ in range(2):  # after the live part refreshed too
        assert browser.execute_script("return window.__pwned === undefined;")
        scripts = browser.execute_script(
            "return Array.from(document.scripts).map(function (s) { return s.src; });"
        )
        assert [s.rsplit("/", 1)[-1] for s in scripts] == ["app.js"]
        assert not browser.find_elements(By.CSS_SELECTOR, "main img, main b")
        browser.get(browser.current_url)
