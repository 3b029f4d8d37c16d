"""The pages over real HTTP in this process: sign-in, CSRF, what a page may and may not show."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs

from buildq.buildrunner import BuildStatus
from buildq.config import Secret
from buildq.orchestrator.schema import builds
from buildq.storage.database import Database, create_engine
from buildq.web.app import CSP
from buildq.web.auth import COOKIE
from tests.integration.web.apps import insert_build, seed, serving
from tests.support.web import TOKEN

PAGES = ["/", "/builds", "/build?id=r-live", "/build?id=r-bad", "/queue", "/login"]
API = ["/api/overview", "/api/builds", "/api/build/timeline?id=r-bad", "/api/queue/topics"]


@pytest.fixture
def sqlite_db(tmp_path: Path) -> Iterator[tuple[str, Database]]:
    from buildq.migrations import upgrade

    url = f"sqlite:///{tmp_path / 'web.db'}"
    upgrade(url)
    db = Database(create_engine(url))
    seed(db)
    yield url, db
    db.dispose()


def _csrf(page: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert found, page
    return found.group(1)


def _sign_in(http: httpx.Client) -> None:
    answer = http.post("/login", data={"token": TOKEN, "next": "queue"})
    assert answer.status_code == 303 and answer.headers["location"] == "queue?notice=signed-in"
    cookie = answer.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert TOKEN not in cookie


def test_page_actions_need_a_session_and_its_csrf_token(sqlite_db, tmp_path):
    url, db = sqlite_db
    with serving(url, tmp_path, db, token=Secret(TOKEN, "env:T")) as http:
        assert http.post("/cancel", data={"id": "r-live", "csrf": "0"}).status_code == 403
        assert http.post("/login", data={"token": "nope"}).status_code == 403
        _sign_in(http)
        page = http.get("/build?id=r-live").text
        assert 'id="cancel"' in page
        assert http.post("/cancel", data={"id": "r-live"}).status_code == 403
        assert http.post("/cancel", data={"id": "r-live", "csrf": "0" * 64}).status_code == 403
        forged = http.cookies.get(COOKIE, "").rsplit(".", 1)[0] + ".0"
        with httpx.Client(base_url=http.base_url, cookies={COOKIE: forged}) as stranger:
            refused = stranger.post("/cancel", data={"id": "r-live", "csrf": _csrf(page)})
        assert refused.status_code == 403
        assert _cancel_requested(db) is None

        done = http.post("/cancel", data={"id": "r-live", "csrf": _csrf(page)})
        assert done.status_code == 303
        assert done.headers["location"] == "build?id=r-live&notice=cancel-requested"
        assert _cancel_requested(db) is not None

        queue = http.get("/queue").text
        assert "runner said 401: token expired" in queue
        letter = {"topic": "buildsignal", "id": "b-bad/poll/1", "partition": "b-bad"}
        form = {**letter, "group": "buildq", "action": "purge", "csrf": _csrf(queue)}
        assert http.post("/dead-letters", data={**form, "group": ""}).status_code == 400
        purged = http.post("/dead-letters", data=form)
        assert purged.headers["location"] == "queue?notice=purged&n=1"
        assert "Purged 1 dead letter(s)." in http.get(purged.headers["location"]).text
        assert "runner said 401" not in http.get("/queue").text


def _cancel_requested(db: Database) -> Any:
    stmt = sa.select(builds.c.cancel_requested_at).where(builds.c.request_id == "r-live")
    return db.read(lambda c: c.execute(stmt).scalar())


def test_sign_in_is_throttled_after_repeated_failures(sqlite_db, tmp_path):
    url, db = sqlite_db
    with serving(url, tmp_path, db, token=Secret(TOKEN, "env:T")) as http:
        codes = [http.post("/login", data={"token": f"guess-{n}"}).status_code for n in range(11)]
        assert codes == [403] * 10 + [429]
        assert http.post("/login", data={"token": TOKEN}).status_code == 429


def test_no_secret_reaches_a_page_the_json_or_the_log(sqlite_db, tmp_path, monkeypatch):
    url, db = sqlite_db
    password = "db-password-7d1e0c55"
    monkeypatch.setenv("BUILDQ_DATABASE__PASSWORD_ENV", "TEST_DB_PASSWORD")
    monkeypatch.setenv("TEST_DB_PASSWORD", password)
    with capture_logs() as logs, serving(url, tmp_path, db, token=Secret(TOKEN, "env:T")) as http:
        http.post("/login", data={"token": "wrong"})
        _sign_in(http)
        bodies = [http.get(path).text for path in PAGES + API]
        http.post("/cancel", data={"id": "r-live", "csrf": _csrf(bodies[2])})
    for text in [*bodies, repr(logs)]:
        assert TOKEN not in text and password not in text
    assert {"web_action_refused", "web_signed_in", "web_action"} <= {e["event"] for e in logs}


def test_runner_urls_become_links_only_when_they_are_http(sqlite_db, tmp_path):
    url, db = sqlite_db

    insert_build(
        db,
        "r-js",
        "b-js",
        BuildStatus.RUNNING,
        metadata={"url": "javascript:alert(1)"},
        request_metadata={"note": '"><script>x()</script>'},
    )
    with serving(url, tmp_path, db) as http:
        for path in ("/builds", "/build?id=r-js"):
            page = http.get(path).text
            assert 'href="javascript' not in page.lower()
            assert "javascript:alert(1)" in page
        page = http.get("/build?id=r-live").text
        assert '<a href="https://ci.example/1" rel="noopener noreferrer"' in page
        assert "<script>x()" not in http.get("/build?id=r-js").text


def test_every_response_carries_the_security_headers(sqlite_db, tmp_path):
    url, db = sqlite_db
    with serving(url, tmp_path, db) as http:
        for path in [*PAGES, "/api/builds", "/build?id=missing"]:
            answer = http.get(path)
            assert answer.headers["content-security-policy"] == CSP, path
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert answer.headers["cache-control"] == "no-store"
        assert http.get("/build?id=missing").status_code == 404
        assert http.get("/static/app.js").status_code == 200


def test_a_host_name_it_is_not_known_by_is_refused(sqlite_db, tmp_path):
    url, db = sqlite_db
    with serving(url, tmp_path, db) as http:
        assert http.get("/", headers={"Host": "rebound.example"}).status_code == 400
        assert http.get("/", headers={"Host": "localhost:9465"}).status_code == 200


def test_links_are_relative_so_a_proxy_may_serve_it_under_a_path(sqlite_db, tmp_path):
    url, db = sqlite_db
    with serving(url, tmp_path, db) as http:
        for path in PAGES:
            page = http.get(path).text
            assert not re.findall(r'(?:href|src|action|data-refresh)="/', page), path


def test_a_database_without_the_schema_is_an_error_page_not_a_traceback(tmp_path):
    (tmp_path / "empty.db").touch()  # a file, but no schema in it
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    db = Database(create_engine(url), retry_for_s=1)
    with serving(url, tmp_path, db) as http:
        page = http.get("/builds")
        assert page.status_code == 503 and "database unavailable" in page.text
        assert "Traceback" not in page.text
        assert http.get("/api/builds").status_code == 503
    db.dispose()
