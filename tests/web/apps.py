"""The web application served by uvicorn in a thread of this process, on a test database
seeded through the real stores: builds written as the daemon writes them, polls published,
a dead letter made by a consumer that rejects."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from buildq.buildrunner import BuildStatus, Change
from buildq.config import load_config
from buildq.db import Database
from buildq.orchestrator import topics
from buildq.orchestrator.controllers import poll_message
from buildq.orchestrator.model import BuildRequest
from buildq.orchestrator.sqlstore import SqlBuildWrites
from buildq.queue.sql import SqlQueue
from buildq.web.app import create_app
from buildq.web.config import WebConfig
from tests.queue.conftest import FAST
from tests.support import wait_until

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


def request(request_id: str, queue: str = "main", **metadata: str) -> BuildRequest:
    return BuildRequest(
        request_id, queue, (Change("base-1", "b1"),), (Change("head-1", "h1"),), metadata
    )


def seed(db: Database) -> None:
    """Three builds as the daemon leaves them: one running (two polls), one succeeded, one
    failed as infra; and a dead letter of a poll in group ``buildq``."""
    queue = SqlQueue(db)

    def write(conn: Any) -> None:
        store = SqlBuildWrites(conn)
        for rid, bid in (("r-live", "b-live"), ("r-ok", "b-ok"), ("r-bad", "b-bad")):
            store.insert_triggered(request(rid, requester="ann"), bid, "ci")
        store.record_poll("b-live", BuildStatus.RUNNING, {"url": "https://ci.example/1"}, 2, 60_000)
        store.finish("b-ok", BuildStatus.SUCCEEDED, {"url": "https://ci.example/2"})
        store.finish("b-bad", BuildStatus.FAILED, {}, failure_reason="infra", error="CI said 500")

    db.write(write)
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
