"""The daemon's operations endpoint: /metrics, /healthz, /readyz (127.0.0.1 by default).

None of them touches the database: /metrics serves the registry (its database gauges are read
by the daemon's refresher thread), and the checks read state the daemon's loops keep. So a
scrape or probe answers at once even while the database hangs. docs/operations.md#metrics.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from buildq.metrics import Metrics

log = structlog.get_logger("buildq.http")

Check = Callable[[], tuple[bool, str]]


class OpsServer:
    def __init__(
        self, bind: str, port: int, metrics: Metrics, healthz: Check, readyz: Check
    ) -> None:
        checks = {"/healthz": healthz, "/readyz": readyz}

        def respond(path: str) -> tuple[int, str, bytes]:
            if path == "/metrics":
                return 200, CONTENT_TYPE_LATEST, generate_latest(metrics.registry)
            check = checks.get(path)
            if check is None:
                return 404, "text/plain", b"not found\n"
            ok, text = check()
            return (200 if ok else 503), "text/plain", (text + "\n").encode()

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                try:
                    code, ctype, body = respond(self.path.split("?", 1)[0])
                except Exception as err:  # a failing check is an unhealthy answer, not a hangup
                    log.exception("ops_request_failed", path=self.path)
                    code, ctype, body = 500, "text/plain", f"{type(err).__name__}\n".encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the prober gave up; nothing to tell it

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the journal

        self._httpd = ThreadingHTTPServer((bind, port), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
