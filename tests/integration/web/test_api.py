"""``/api/…`` on both backends: the CLI's ``--json`` shapes, the overview's arithmetic, and
actions behind the bearer token."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from buildq.orchestrator import topics
from buildq.orchestrator.schema import builds
from buildq.queue.sql.schema import messages
from buildq.storage.database import Database
from buildq.web.config import WebConfig
from tests.integration.web.apps import seed, serving
from tests.support.cli import run_cli
from tests.support.web import TOKEN

Serve = Callable[..., AbstractContextManager[httpx.Client]]


@pytest.fixture
def serve(backend_url: str, db: Database, tmp_path: Path) -> Iterator[Serve]:
    yield lambda **web: serving(backend_url, tmp_path, db, **web)


def _without_clock(leases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in lease.items() if k != "expires_in_ms"} for lease in leases]


def test_api_answers_in_the_cli_json_shapes(serve, db, backend_url, capsys):
    seed(db)

    def cli(*argv: str) -> Any:
        result = run_cli([*argv, "--url", backend_url, "--json"], capsys)
        assert result.code == 0, result.err
        return result.data

    with serve() as http:
        assert http.get("/api/builds").json() == cli("builds", "ls")
        assert http.get("/api/builds?status=FAILED").json() == cli(
            "builds", "ls", "--status", "FAILED"
        )
        assert http.get("/api/build?id=r-live").json() == cli("builds", "show", "r-live")
        assert http.get("/api/queue/topics").json() == cli("queue", "topics")
        assert http.get("/api/queue/lag?topic=buildsignal").json() == cli(
            "queue", "lag", "--topic", "buildsignal"
        )
        leases = http.get("/api/queue/leases").json()
        assert _without_clock(leases) == _without_clock(cli("queue", "leases"))
        assert http.get("/api/dlq?topic=buildsignal").json() == cli(
            "dlq", "ls", "--topic", "buildsignal"
        )
        missing = http.get("/api/build?id=nope")
        assert missing.status_code == 404 and "error" in missing.json()


def test_overview_counts_per_queue_and_runner(serve, db):
    seed(db)
    with serve() as http:
        overview = http.get("/api/overview").json()
    [main] = [q for q in overview["queues"] if q["queue"] == "main"]
    assert main["in_flight"] == {"ACCEPTED": 0, "RUNNING": 1, "UNKNOWN": 0}
    assert main["finished_last_hour"] == {"SUCCEEDED": 1, "FAILED": 1, "CANCELLED": 0}
    assert main["failure_reasons_last_hour"] == {"infra": 1}
    assert main["dead_letters"] == 1 and main["runner"] == "ci"
    [runner] = overview["runners"]
    assert (runner["runner"], runner["type"], runner["health"]) == ("ci", "sim", "degraded")
    assert runner["retrying_polls"] == 2 and runner["last_error"] == "runner timed out"
    assert overview["dead_letters"] == [
        {"topic": "buildsignal", "group": "buildq", "dead_letters": 1}
    ]
    assert len(overview["finished_per_minute"]) == 60
    assert sum(p["SUCCEEDED"] + p["FAILED"] for p in overview["finished_per_minute"]) == 2


def test_poll_lateness_is_read_from_the_poll_chain(serve, db):
    """Poll n was done when poll n+1 was published, the last when the build finished."""
    seed(db)
    now = int(db.read(lambda c: c.execute(sa.select(sa.func.max(builds.c.updated_at))).scalar()))
    t0 = now - now % 60_000 - 5 * 60_000 + 1_000  # early in a minute five minutes ago
    chain = [("b-ok/poll/1", t0, t0 + 1_000), ("b-ok/poll/2", t0 + 1_500, t0 + 3_000)]

    def rewrite(conn: Any) -> None:
        conn.execute(sa.delete(messages).where(messages.c.partition_key == "b-ok"))
        for message_id, created, due in chain:
            conn.execute(
                sa.insert(messages).values(
                    topic=topics.BUILDSIGNAL,
                    partition_key="b-ok",
                    message_id=message_id,
                    payload=b"{}",
                    metadata="{}",
                    created_at=created,
                    visible_after=due,
                )
            )
        done = {"finished_at": t0 + 5_000, "updated_at": now}
        conn.execute(sa.update(builds).where(builds.c.build_id == "b-ok").values(**done))

    db.write(rewrite)
    with serve() as http:
        series = http.get("/api/overview").json()["poll_lateness_per_minute"]
    [minute] = [p for p in series if p["minute_ms"] == t0 - 1_000]
    # poll 1: due t0+1000, done t0+1500 (500 late); poll 2: due t0+3000, done t0+5000 (2000).
    assert (minute["polls"], minute["mean_ms"], minute["max_ms"]) == (2, 1250, 2000)


def test_api_actions_need_the_bearer_token(serve, db):
    seed(db)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with serve() as http:
        refused = http.post("/api/cancel?id=r-live", headers=bearer)
        assert refused.status_code == 403 and "actions are off" in refused.json()["error"]
    with serve(token=_secret()) as http:
        assert http.post("/api/cancel?id=r-live").status_code == 401
        wrong = {"Authorization": "Bearer " + "x" * len(TOKEN)}
        assert http.post("/api/cancel?id=r-live", headers=wrong).status_code == 401
        assert _cancel_requested(db, "r-live") is None
        done = http.post("/api/cancel?id=r-live", headers=bearer)
        assert done.json() == {"id": "r-live", "build_id": "b-live", "outcome": "requested"}
        assert _cancel_requested(db, "r-live") is not None
        again = http.post("/api/cancel?id=r-ok", headers=bearer).json()
        assert again["outcome"] == "already_finished"

        one = "topic=buildsignal&id=b-bad/poll/1&partition=b-bad&group=buildq"
        assert http.post("/api/dlq/requeue?topic=buildsignal", headers=bearer).status_code == 400
        requeued = http.post(f"/api/dlq/requeue?{one}", headers=bearer).json()
        assert [r["message_id"] for r in requeued["requeued"]] == ["b-bad/poll/1"]
        assert http.get("/api/dlq?topic=buildsignal").json() == []
        purged = http.post("/api/dlq/purge?topic=buildsignal&all=1", headers=bearer).json()
        assert purged == {"deleted": 0}


def _secret() -> Any:
    from buildq.config import Secret

    return Secret(TOKEN, "env:TEST")


def _cancel_requested(db: Database, request_id: str) -> Any:
    stmt = sa.select(builds.c.cancel_requested_at).where(builds.c.request_id == request_id)
    return db.read(lambda c: c.execute(stmt).scalar())


def test_web_config_defaults_are_loopback_and_read_only():
    web = WebConfig()
    assert (web.bind, web.actions_enabled) == ("127.0.0.1", False)


def test_results_filter_by_status_reason_queue_and_id(serve, db):
    seed(db)

    def ids(query: str) -> list[str]:
        return [b["request_id"] for b in http.get("/api/results?" + query).json()]

    with serve() as http:
        assert sorted(ids("")) == ["r-bad", "r-ok"]
        assert ids("reason=infra") == ids("status=FAILED") == ids("q=-ba") == ["r-bad"]
        assert ids("status=RUNNING") == ids("queue=other") == []
        page = http.get("/builds?reason=infra").text
        assert 'data-request-id="r-bad"' in page and 'data-request-id="r-live"' not in page
