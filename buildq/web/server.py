"""``buildq web``: serve the status page with uvicorn until SIGTERM."""

from __future__ import annotations

import socket

import structlog
import uvicorn

from buildq import logs
from buildq.config import Config
from buildq.storage.database import Database, create_engine, redacted_url
from buildq.systemd import Notifier
from buildq.web.app import create_app
from buildq.web.config import WebConfig

log = structlog.get_logger("buildq.web")

#: Connections of the page's process: requests are short reads, a few at a time.
POOL_SIZE = 4
#: A page waits this long for an unavailable database before it says so.
DB_RETRY_S = 3.0


def serve(config: Config, web: WebConfig) -> int:
    logs.configure(config.daemon.log_level, config.daemon.log_format)
    db = Database(
        create_engine(config.database.connect_url(), pool_size=POOL_SIZE), retry_for_s=DB_RETRY_S
    )
    notifier = Notifier()
    # Listen before uvicorn starts, so the address (with port 0: the one the kernel chose) is
    # known and logged, and connections made meanwhile wait in the backlog.
    sock = _listen(web.bind, web.port)
    host, port = sock.getsockname()[:2]

    def stopping() -> None:
        notifier.stopping()
        log.info("web_stopping")
        db.dispose()

    app = create_app(config, web, db, on_ready=notifier.ready, on_stopping=stopping)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            log_config=None,
            access_log=False,  # a reverse proxy logs requests; actions are logged by the app
            proxy_headers=True,
            forwarded_allow_ips=list(web.trusted_proxies),
            server_header=False,
            timeout_graceful_shutdown=5,
        )
    )
    shown_host = f"[{host}]" if ":" in host else host
    log.info(
        "web_listening",
        url=f"http://{shown_host}:{port}/",
        actions=web.actions_enabled,
        database=redacted_url(config.database.url),
    )
    # On SIGTERM uvicorn drains requests, runs the shutdown above, then re-raises the signal:
    # the process ends "killed by SIGTERM", which systemd counts as a clean stop.
    server.run(sockets=[sock])
    return 0


def _listen(bind: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((bind, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
