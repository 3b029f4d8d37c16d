"""The daemon's operations endpoint: /metrics, /healthz, /readyz (127.0.0.1 by default).

None of them touches the database: /metrics serves the registry (its database gauges are read
by the daemon's refresher thread), and the checks read state the daemon's loops keep. So a
scrape or probe answers at once even while the database hangs. docs/operations.md#metrics.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TypeVar

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from buildq.config import ConfigError
from buildq.metrics import Metrics

log = structlog.get_logger("buildq.http")

Check = Callable[[], tuple[bool, str]]
ServerT = TypeVar("ServerT", bound=ThreadingHTTPServer)


def bind_server(
    server_class: type[ServerT],
    bind: str,
    port: int,
    handler: type[BaseHTTPRequestHandler],
    *,
    table: str,
) -> ServerT:
    """``server_class((bind, port), handler)``, or a ConfigError naming the ``[table]`` key to
    change: a port in use or an address that is not this host's is an operator's fix, and
    restarting would not make it go away (the unit treats the exit status 2 as final)."""
    try:
        return server_class((bind, port), handler)
    except OSError as err:
        raise _bind_error(table, bind, port, err) from None


def _bind_error(table: str, bind: str, port: int, err: OSError) -> ConfigError:
    where = f"{bind}:{port}"
    if err.errno == errno.EADDRINUSE:
        return ConfigError(
            f"{table}.port",
            port,
            f"a free port ({where} is in use by another process: "
            f"'ss -ltnp sport = :{port}' shows which; pick another port or stop it)",
        )
    if err.errno == errno.EACCES:
        return ConfigError(
            f"{table}.port",
            port,
            f"a port this user may listen on ({where}: permission denied; "
            "ports below 1024 need CAP_NET_BIND_SERVICE)",
        )
    reason = err.strerror or type(err).__name__
    return ConfigError(f"{table}.bind", bind, f"an address of this host to listen on ({reason})")


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
                self._answer(with_body=True)

            def do_HEAD(self) -> None:
                # What GET would answer, without the body: uptime checkers and load balancers
                # probe with HEAD.
                self._answer(with_body=False)

            def _answer(self, *, with_body: bool) -> None:
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
                    if with_body:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the prober gave up; nothing to tell it

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the journal

        self._httpd = bind_server(ThreadingHTTPServer, bind, port, Handler, table="http")
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
