"""The daemon's operations endpoint: /metrics, /healthz, /readyz (127.0.0.1 by default).

None of them touches the database: /metrics serves the registry (its database gauges are read
by the daemon's refresher thread), and the checks read state the daemon's loops keep. So a
scrape or probe answers at once even while the database hangs. Slow or idle clients cost
no thread and are cut off after a few seconds (``buildq.httpserver``). docs/operations.md#metrics.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from buildq.config import ConfigError
from buildq.httpserver import BoundedHTTPServer, Limits, ReceivedRequestHandler
from buildq.metrics import Metrics

log = structlog.get_logger("buildq.http")

Check = Callable[[], tuple[bool, str]]

#: Scrapers and probes send their request at once and are answered from memory: two workers,
#: a 5 s deadline for the whole request and 32 connections are plenty (a Prometheus server
#: scrapes one at a time, a kubelet probes twice), and nothing an operator needs to tune.
OPS_LIMITS = Limits(max_connections=32, request_timeout_s=5.0, workers=2)


def bind_server(
    bind: str,
    port: int,
    handler: type[ReceivedRequestHandler],
    limits: Limits,
    *,
    table: str,
    name: str,
) -> BoundedHTTPServer:
    """A server for ``handler`` on ``bind:port``, or a ConfigError naming the ``[table]`` key to
    change: a port in use or an address that is not this host's is an operator's fix, and
    restarting would not make it go away (the unit treats the exit status 2 as final)."""
    try:
        return BoundedHTTPServer((bind, port), handler, limits, name=name)
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

        class Handler(ReceivedRequestHandler):
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
                except OSError:
                    self.close_connection = True  # the prober gave up; nothing to tell it

        self._httpd = bind_server(bind, port, Handler, OPS_LIMITS, table="http", name="ops")
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ops-http", daemon=True
        )

    @property
    def port(self) -> int:
        return self._httpd.port

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
