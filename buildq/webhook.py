"""Webhook receiver: CI services say "this build changed" so the daemon polls it now.

A push is only a hint. The receiver verifies the delivery, turns it into the BuildID the
runner gave that build, and hands it to ``on_build_event``; the daemon makes that build's one
pending poll due now and the ordinary poll path reads the status. Nothing here decides a
build's state, so a lost or forged-but-rejected delivery costs at most latency (some services
never retry a failed delivery: the safety poll stays mandatory).

Every delivery must be signed or tokened as its runner kind says: the kind's
``registry.WebhookSpec`` verifies it and names the build in it (each runner module holds its
own service's check, e.g. ``buildkite.verify_signature``). Anything else is refused before
its JSON is parsed. Nothing here is specific to one CI service.

The server (``buildq.httpserver``) receives each request whole before a worker sees it: a
client gets ``read_timeout_s`` for its whole request (headers and body), slow or idle ones cost
no thread, and at most ``MAX_CONNECTIONS`` are open at once.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from buildq.buildrunner import registry
from buildq.buildrunner.contract import BuildID
from buildq.config.base import ConfigError, Secret, Table
from buildq.httpserver import (
    BoundedHTTPServer,
    Limits,
    ReceivedRequestHandler,
    content_length,
)
from buildq.orchestrator.http import bind_server

OnBuildEvent = Callable[[str, BuildID], None]

PATH_PREFIX = "/webhooks/"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_log = structlog.get_logger("buildq.webhook")

#: Open connections at most. A delivery is answered in milliseconds (while the database
#: answers), so this many at once means a flood, not CI traffic; each may buffer up to
#: ``max_body_bytes``. Excess ones are cut off (see ``buildq.httpserver``).
MAX_CONNECTIONS = 64
#: Threads that verify and dispatch deliveries. The dispatch writes to the database and waits
#: for it while it is unavailable: more threads would only queue on it too.
WORKERS = 4


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """The daemon's ``[webhooks]`` table. Off unless ``enabled = true``."""

    enabled: bool = False
    bind: str = "127.0.0.1"
    port: int = 8787
    max_body_bytes: int = 1_048_576
    tolerance_s: float = 300.0
    #: The whole request (line, headers and body) must arrive within this; it is also the
    #: socket timeout while the answer is written.
    read_timeout_s: float = 10.0

    @classmethod
    def from_table(cls, table: Table) -> WebhookConfig:
        return cls(
            enabled=table.bool("enabled", False),
            bind=table.str("bind", "127.0.0.1"),
            port=table.int("port", 8787, min=0, max=65535),
            max_body_bytes=table.int("max_body_bytes", 1_048_576, min=1024),
            tolerance_s=table.float("tolerance_s", 300.0, min=1.0),
            read_timeout_s=table.float("read_timeout_s", 10.0, min=0.1, max=300.0),
        )

    @property
    def limits(self) -> Limits:
        return Limits(
            max_connections=MAX_CONNECTIONS,
            request_timeout_s=self.read_timeout_s,
            workers=WORKERS,
            max_body_bytes=self.max_body_bytes,
            write_timeout_s=self.read_timeout_s,
        )


@dataclass(frozen=True, slots=True)
class WebhookRoute:
    """``POST /webhooks/<runner_name>``: which vendor signs it and with what secret."""

    runner_name: str
    kind: str
    secret: Secret

    def __post_init__(self) -> None:
        if self.spec is None:  # resolving it here refuses a kind that has no webhooks
            raise ValueError(f"runner type {self.kind!r} has no webhooks")
        if not _NAME.match(self.runner_name):
            raise ValueError(f"runner name {self.runner_name!r} cannot be a webhook path")

    @property
    def spec(self) -> registry.WebhookSpec | None:
        return registry.get(self.kind).webhook


def route_for(runner_name: str, config: object, kind: str | None = None) -> WebhookRoute | None:
    """The route for a runner whose table sets ``webhook_secret_env``/``_file``, else None.

    ``kind`` defaults to the one whose config class ``config`` is (built-in kinds only).
    """
    if kind is None:  # built-in config classes live in the module named after their kind
        kind = type(config).__module__.rsplit(".", 1)[-1]
    spec = registry.get(kind).webhook
    secret = spec.secret(config) if spec is not None else None
    return None if secret is None else WebhookRoute(runner_name, kind, secret)


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int
    reason: str


class WebhookServer:
    """An HTTP server on its own port that turns signed CI deliveries into build events."""

    def __init__(
        self,
        config: WebhookConfig,
        routes: Iterable[WebhookRoute],
        on_build_event: OnBuildEvent,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._routes: dict[str, WebhookRoute] = {}
        for route in routes:
            if route.runner_name in self._routes:
                raise ConfigError("webhooks", route.runner_name, "one route per runner name")
            self._routes[route.runner_name] = route
        self._on_build_event = on_build_event
        self._clock = clock
        self._server: BoundedHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("webhook server is not started")
        return self._server.port

    @property
    def url(self) -> str:
        return f"http://{self.config.bind}:{self.port}"

    def start(self) -> None:
        if self._server is not None:
            return
        server = bind_server(
            self.config.bind,
            self.config.port,
            _handler_for(self),
            self.config.limits,
            table="webhooks",
            name="webhooks",
        )
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.1},  # how long stop() may wait for the loop
            name="buildq-webhooks",
            daemon=True,
        )
        self._thread.start()
        _log.info("webhook_server_started", bind=self.config.bind, port=self.port)

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None
        _log.info("webhook_server_stopped")

    def route(self, path: str) -> WebhookRoute | None:
        name = (
            path.split("?", 1)[0].removeprefix(PATH_PREFIX) if path.startswith(PATH_PREFIX) else ""
        )
        return self._routes.get(name)

    def handle(self, route: WebhookRoute, headers: Mapping[str, str], body: bytes) -> Outcome:
        """Verify, parse and dispatch one delivery whose size was already checked.

        ``headers`` are keyed by lower-case name.
        """
        rejected = self._verify(route, headers, body)
        if rejected is not None:
            return Outcome(401, rejected)
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, ValueError, RecursionError):
            return Outcome(400, "malformed_json")
        if not isinstance(payload, dict):
            return Outcome(400, "malformed_json")
        spec = route.spec
        assert spec is not None  # checked when the route was made
        try:
            build_id = spec.decode(headers, payload)
        except registry.MalformedEvent:
            return Outcome(400, "no_build_in_event")
        if build_id is None:
            return Outcome(200, "ignored")
        try:
            self._on_build_event(route.runner_name, build_id)
        except Exception:
            _log.exception(
                "webhook_callback_failed", runner=route.runner_name, build_id=build_id.id
            )
            return Outcome(500, "callback_failed")
        _log.info("webhook_build_event", runner=route.runner_name, build_id=build_id.id)
        return Outcome(202, "accepted")

    def _verify(self, route: WebhookRoute, headers: Mapping[str, str], body: bytes) -> str | None:
        spec = route.spec
        assert spec is not None  # checked when the route was made
        return spec.verify(
            headers,
            body,
            route.secret.reveal(),
            now=self._clock(),
            tolerance_s=self.config.tolerance_s,
        )


def _handler_for(receiver: WebhookServer) -> type[ReceivedRequestHandler]:
    class Handler(_Handler):
        pass

    Handler.receiver = receiver
    return Handler


class _Handler(ReceivedRequestHandler):
    receiver: WebhookServer  # set on the subclass ``_handler_for`` makes

    def do_POST(self) -> None:
        receiver = self.receiver
        route = receiver.route(self.path)
        if route is None:
            self._answer(Outcome(404, "unknown_runner"), None)
            return
        length = content_length(self.headers)
        if length is None:
            self._answer(Outcome(411, "length_required"), route)
            return
        if length > receiver.config.max_body_bytes:
            self._answer(Outcome(413, "too_large"), route)
            return
        body = self.rfile.read(length)  # received already: the server read it in full
        if len(body) != length:
            self._answer(Outcome(400, "short_body"), route)
            return
        headers = {name.lower(): value for name, value in self.headers.items()}
        try:
            outcome = receiver.handle(route, headers, body)
        except Exception:
            _log.exception("webhook_handler_failed", runner=route.runner_name)
            outcome = Outcome(500, "internal_error")
        self._answer(outcome, route)

    def do_GET(self) -> None:
        self._answer(Outcome(405, "method_not_allowed"), None)

    do_PUT = do_DELETE = do_PATCH = do_GET

    def _answer(self, outcome: Outcome, route: WebhookRoute | None) -> None:
        if outcome.status >= 400:
            _log.warning(
                "webhook_rejected",
                runner=route.runner_name if route else None,
                status=outcome.status,
                reason=outcome.reason,
            )
        payload = json.dumps({"status": outcome.reason}).encode()
        try:
            self.send_response(outcome.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")  # one request per connection
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except OSError as err:
            # The client hung up (or stopped reading) before the answer: what it asked for
            # is done or refused all the same, and there is no one left to tell.
            self.close_connection = True
            _log.info(
                "webhook_client_gone",
                runner=route.runner_name if route else None,
                status=outcome.status,
                error=type(err).__name__,
            )
