"""The HTTP plumbing both fake CI services share: a real server on 127.0.0.1, faults, limits.

A vendor fake subclasses ``FakeService`` and implements ``route`` (its endpoints) plus the
rate-limit headers in its vendor's spelling. Everything a test steers goes through public
methods (``inject``, ``rate.block``...) and everything it asserts on is recorded in
``requests``.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    """One request as the fake saw it. ``at`` is ``time.monotonic()`` on arrival."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any
    at: float
    status: int = 0

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class Reply:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Whether a GET answer may carry an ETag and be answered 304 next time.
    cacheable: bool = False


@dataclass
class Fault:
    """Misbehaviour for the next ``count`` matching requests."""

    status: int | None = None
    delay_s: float = 0.0
    #: Run the real handler first (the build gets created), then answer ``status``.
    after_handling: bool = False
    method: str | None = None
    path: str | None = None
    count: int = 1
    body: Any = None
    #: Headers of the fault's answer; they win over the rate-limit headers the fake adds.
    headers: dict[str, str] = field(default_factory=dict)

    def matches(self, request: Request) -> bool:
        return (self.method is None or self.method == request.method) and (
            self.path is None or self.path in request.path
        )


class RateWindow:
    """A fixed-window request budget, like the vendors keep per credential."""

    def __init__(self, limit: int, window_s: float) -> None:
        self.limit = limit
        self.window_s = window_s
        self.remaining = limit
        self.reset_at = time.monotonic() + window_s

    def set(self, *, remaining: int, reset_in_s: float, limit: int | None = None) -> None:
        """Start a window with ``remaining`` requests left that resets in ``reset_in_s``."""
        self.limit = limit if limit is not None else self.limit
        self.remaining = remaining
        self.reset_at = time.monotonic() + reset_in_s

    def block(self, reset_in_s: float) -> None:
        """Answer every request "rate limited" until ``reset_in_s`` from now."""
        self.set(remaining=0, reset_in_s=reset_in_s)

    def take(self, now: float) -> bool:
        if now >= self.reset_at:
            self.remaining, self.reset_at = self.limit, now + self.window_s
        if self.remaining <= 0:
            return False
        self.remaining -= 1
        return True

    def refund(self) -> None:
        self.remaining = min(self.remaining + 1, self.limit)

    def reset_in(self, now: float) -> int:
        return max(math.ceil(self.reset_at - now), 0)


class FakeService:
    """Base of the fake vendors: lifecycle, auth, faults, rate limits, ETags, recording."""

    def __init__(self, *, token: str, rate_limit: int, window_s: float) -> None:
        self.token = token
        self.rate = RateWindow(rate_limit, window_s)
        self.requests: list[Request] = []
        self.lock = threading.RLock()
        self._faults: list[Fault] = []
        self._block_after: tuple[int, float] | None = None
        self._denied: Reply | None = None
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # lifecycle -------------------------------------------------------------------------
    def start(self) -> Self:
        server = _Server(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # steering --------------------------------------------------------------------------
    def inject(self, fault: Fault) -> None:
        with self.lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        *,
        method: str | None = None,
        path: str | None = None,
    ) -> None:
        self.inject(Fault(status=status, count=count, method=method, path=path))

    def block_after(self, requests: int, reset_in_s: float) -> None:
        """Let ``requests`` more through, then answer "rate limited" for ``reset_in_s``.

        Stands in for the rest of an organisation spending the shared budget: the runner
        sees plenty left in the headers, then a 429 it could not have predicted.
        """
        with self.lock:
            self._block_after = (requests, reset_in_s)

    def deny(self, status: int | None, message: str = "Not Found") -> None:
        """Answer every request with the token ``status`` (None: serve again). A token that
        lost a permission gets 403; one that cannot see a private repository or pipeline
        gets 404 for everything in it, as GitHub and Buildkite answer."""
        with self.lock:
            self._denied = None if status is None else Reply(status, {"message": message})

    def request_count(self, method: str | None = None, path: str | None = None) -> int:
        return len(self.requests_matching(method, path))

    def requests_matching(
        self, method: str | None = None, path: str | None = None
    ) -> list[Request]:
        with self.lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or path in r.path)
            ]

    # vendor hooks ----------------------------------------------------------------------
    def route(self, request: Request) -> Reply:
        raise NotImplementedError

    def rate_headers(self, now: float) -> dict[str, str]:
        raise NotImplementedError

    def rate_limited(self, now: float) -> Reply:
        raise NotImplementedError

    def etag_304_is_free(self) -> bool:
        return False

    def authorized(self, request: Request) -> bool:
        """Whether the request carries the credential (a bearer token unless overridden)."""
        return request.headers.get("authorization") == f"Bearer {self.token}"

    # request handling ------------------------------------------------------------------
    def serve(self, request: Request) -> Reply:
        with self.lock:
            self.requests.append(request)
        if not self.authorized(request):
            return Reply(401, {"message": "Bad credentials"})
        with self.lock:
            denied = self._denied
        if denied is not None:
            return Reply(denied.status, denied.body)
        with self.lock:
            now = time.monotonic()
            self._count_down_to_block()
            allowed = self.rate.take(now)
            reply = None if allowed else self.rate_limited(now)
            fault = None if reply else self._take_fault(request)
        if fault is not None:
            reply = self._apply(fault, request)
        if reply is None:
            with self.lock:
                reply = self.route(request)
        reply = self._conditional(request, reply)
        with self.lock:
            reply.headers = {**self.rate_headers(time.monotonic()), **reply.headers}
        return reply

    def _count_down_to_block(self) -> None:
        if self._block_after is None:
            return
        left, reset_in_s = self._block_after
        if left > 0:
            self._block_after = (left - 1, reset_in_s)
        else:
            self._block_after = None
            self.rate.block(reset_in_s)

    def _take_fault(self, request: Request) -> Fault | None:
        for fault in self._faults:
            if fault.matches(request):
                fault.count -= 1
                if fault.count <= 0:
                    self._faults.remove(fault)
                return fault
        return None

    def _apply(self, fault: Fault, request: Request) -> Reply | None:
        handled = None
        if fault.after_handling:
            with self.lock:
                handled = self.route(request)
        if fault.delay_s:
            self._stopping.wait(fault.delay_s)
        if fault.status is None:
            return handled
        body = fault.body if fault.body is not None else {"message": "fault"}
        return Reply(fault.status, body, dict(fault.headers))

    def _conditional(self, request: Request, reply: Reply) -> Reply:
        if not (reply.cacheable and reply.status == 200 and request.method == "GET"):
            return reply
        etag = '"' + hashlib.sha1(json.dumps(reply.body, sort_keys=True).encode()).hexdigest() + '"'
        reply.headers["ETag"] = etag
        if request.headers.get("if-none-match") == etag:
            if self.etag_304_is_free():
                with self.lock:
                    self.rate.refund()
            return Reply(304, None, {"ETag": etag})
        return reply


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # 20 polling threads connect at once in the rate-limit tests


def _handler_for(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as separate writes

        def _serve(self) -> None:
            split = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            form = "application/x-www-form-urlencoded" in self.headers.get("Content-Type", "")
            try:
                body: Any = json.loads(raw) if raw and not form else None
            except ValueError:
                body = None
            if form:  # a form post (Jenkins): one value per field
                body = {k: v[0] for k, v in parse_qs(raw.decode(), keep_blank_values=True).items()}
            request = Request(
                method=self.command,
                path=split.path,
                query=parse_qs(split.query),
                headers={k.lower(): v for k, v in self.headers.items()},
                body=body,
                at=time.monotonic(),
            )
            reply = service.serve(request)
            request.status = reply.status
            # A str body is a page (Jenkins answers some errors in HTML), anything else JSON.
            text = isinstance(reply.body, str)
            payload = (
                b""
                if reply.body is None
                else (reply.body.encode() if text else json.dumps(reply.body).encode())
            )
            try:
                self.send_response(reply.status)
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                if payload:
                    kind = "text/html" if text else "application/json"
                    self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
            except OSError:
                self.close_connection = True  # the client gave up waiting (timeout tests)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
