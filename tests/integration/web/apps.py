"""The web application served by uvicorn in a thread of this process, on a test database
seeded through the real stores: builds written as the daemon writes them, polls published,
a dead letter made by a consumer that rejects."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
import uvicorn

from buildq.buildrunner import BuildStatus
from buildq.config import load_config
from buildq.orchestrator import topics
from buildq.orchestrator.chain import poll_message
from buildq.orchestrator.schema import builds
from buildq.orchestrator.sqlstore import NOW
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database
from buildq.web.app import create_app
from buildq.web.config import WebConfig
from tests.support.database import FAST
from tests.support.waiting import wait_until

CONFIG = """
[database]
url = "{url}"

[runners.ci]
type = "sim"

[queues.main]
runner = "ci"

[queues.other]
runner = "ci"
"""


@contextmanager
def serving(url: str, directory: Path, db: Database, **web: Any) -> Iterator[httpx.Client]:
    """The app on a free loopback port; an HTTP client pointed at it (redirects not followed)."""
    path = directory / "buildq.toml"
    path.write_text(CONFIG.format(url=url))
    path.chmod(0o600)
    app = create_app(load_config(path), WebConfig(**web), db)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False))
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, message="uvicorn started")
        port = sock.getsockname()[1]
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            yield http
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def insert_build(
    db: Database,
    request_id: str,
    build_id: str,
    status: BuildStatus,
    *,
    metadata: dict[str, str] | None = None,
    request_metadata: dict[str, str] | None = None,
    failure_reason: str | None = None,
    error: str | None = None,
    polls: int = 0,
    queue: str = "main",
) -> None:
    """A row of ``builds`` as the daemon leaves it (written with Core: the build store's own
    write API belongs to the poll engine and changes with it)."""
    changes = {
        "base": [{"id": "base-1", "revision": "b1"}],
        "head": [{"id": "head-1", "revision": "h1"}],
    }
    now = db.read(lambda c: int(c.execute(sa.select(NOW)).scalar_one()))
    row = {
        "request_id": request_id,
        "build_id": build_id,
        "queue": queue,
        "runner": "ci",
        "status": status.value,
        "metadata": json.dumps(metadata or {}),
        "request_metadata": json.dumps(request_metadata or {}),
        "changes": json.dumps(changes),
        "failure_reason": failure_reason,
        "error": error,
        "polls": polls,
        "created_at": now - 60_000,
        "updated_at": now,
        "finished_at": now if status.is_terminal else None,
        "next_poll_at": None if status.is_terminal else now + 60_000,
    }
    db.write(lambda conn: conn.execute(sa.insert(builds), row))


def seed(db: Database) -> None:
    """Three builds as the daemon leaves them: one running (two polls), one succeeded, one
    failed as infra; and a dead letter of a poll in group ``buildq``."""
    queue = SqlQueue(db)
    meta = {"requester": "ann"}
    insert_build(
        db,
        "r-live",
        "b-live",
        BuildStatus.RUNNING,
        polls=2,
        request_metadata=meta,
        metadata={"url": "https://ci.example/1"},
    )
    insert_build(
        db,
        "r-ok",
        "b-ok",
        BuildStatus.SUCCEEDED,
        polls=3,
        request_metadata=meta,
        metadata={"url": "https://ci.example/2"},
    )
    insert_build(
        db,
        "r-bad",
        "b-bad",
        BuildStatus.FAILED,
        polls=1,
        request_metadata=meta,
        failure_reason="infra",
        error="CI said 500",
    )
    for n in (1, 2):
        queue.publish(topics.BUILDSIGNAL, poll_message("b-live", n))
    queue.publish(topics.BUILDSIGNAL, poll_message("b-bad", 1))
    subscription = queue.subscribe(topics.BUILDSIGNAL, topics.GROUP, FAST)
    try:
        wanted = "b-bad/poll/1"
        for delivery in wait_until(lambda: subscription.fetch(10)):
            if delivery.message.id == wanted:
                delivery.reject("runner said 401: token expired")
            else:
                delivery.nack(60_000, error="runner timed out")
    finally:
        subscription.close()
        queue.close()
