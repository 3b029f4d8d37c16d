"""The HTTP server behind the daemon's two endpoints (ops and webhooks): slow clients cost no
thread.

``http.server.ThreadingHTTPServer`` gives every connection a thread that reads the request
itself, and a socket timeout bounds each read, not the request: 150 clients trickling a byte a
second held 150 threads for as long as they liked. Here one thread receives every
connection's request without blocking, and only a *complete* request (request line, headers
and the body its Content-Length announces) goes to one of a few worker threads, which run an
ordinary ``BaseHTTPRequestHandler`` over the bytes received and write the answer with a socket
timeout. So, whatever the clients do:

- threads: the receiving one plus ``Limits.workers``;
- a request must arrive whole within ``request_timeout_s`` of the connection, else it is
  answered ``408`` and closed;
- at most ``max_connections`` are open: at the cap a new connection displaces the one that has
  been sending its request the longest (answered ``503``); when every open connection already
  sent its request (it is waiting for a worker or being answered), the new one gets the ``503``.

HTTP/1.0: one request per connection, as ``BaseHTTPRequestHandler`` does by default.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import re
import selectors
import socket
import socketserver
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler
from queue import SimpleQueue
from typing import Literal

import structlog

log = structlog.get_logger("buildq.http")

#: A Content-Length of more digits is not a length anyone means (and ``int()`` refuses strings
#: of thousands of digits): it counts as larger than any limit.
_MAX_LENGTH_DIGITS = 18
TOO_LONG = 10**_MAX_LENGTH_DIGITS
_HEAD_END = re.compile(rb"\r?\n\r?\n")
#: Dropped connections are logged as one summary per server at most this often: a flood of
#: slow clients must not become a flood of log lines.
_SUMMARY_EVERY_S = 60.0
#: After accept() fails (out of file descriptors), stop accepting for this long: the listening
#: socket stays readable, and retrying at once would spin.
_ACCEPT_PAUSE_S = 0.5
_WHY = {
    HTTPStatus.REQUEST_TIMEOUT: "the request did not arrive in time",
    HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE: "the request line and headers are too large",
    HTTPStatus.SERVICE_UNAVAILABLE: "too many connections",
}

State = Literal["head", "body", "complete", "too_large"]


@dataclass(frozen=True, slots=True)
class Limits:
    """What one server allows; see the module's docstring."""

    max_connections: int
    request_timeout_s: float
    workers: int
    #: A longer body is not waited for: the handler refuses it unread (``0``: no bodies).
    max_body_bytes: int = 0
    max_head_bytes: int = 65_536
    #: Socket timeout while a worker writes the answer (per send).
    write_timeout_s: float = 10.0


def content_length(headers: Message) -> int | None:
    """The body length ``headers`` announce; None when there is none to go by (absent, not
    ASCII digits, or with Transfer-Encoding, which neither endpoint takes); ``TOO_LONG`` for
    a number of more than 18 digits."""
    if headers.get("Transfer-Encoding") is not None:
        return None
    value = str(headers.get("Content-Length", "")).strip()
    if not (value.isascii() and value.isdigit()):  # "²".isdigit() is true as well
        return None
    value = value.lstrip("0") or "0"
    return int(value) if len(value) <= _MAX_LENGTH_DIGITS else TOO_LONG


@dataclass(eq=False)
class _Pending:
    """A connection whose request is still arriving."""

    sock: socket.socket
    address: tuple[str, int]
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    head_end: int | None = None
    body_bytes: int = 0  # how many body bytes to wait for, once the head is in

    def feed(self, chunk: bytes, limits: Limits) -> State:
        scanned = max(0, len(self.data) - 3)  # the end of the head may straddle two chunks
        self.data += chunk
        if self.head_end is None:
            match = _HEAD_END.search(self.data, scanned)
            if match is None or match.end() > limits.max_head_bytes:
                return "too_large" if len(self.data) > limits.max_head_bytes else "head"
            self.head_end = match.end()
            self.body_bytes = _body_to_wait_for(bytes(self.data[: self.head_end]), limits)
        if len(self.data) - self.head_end >= self.body_bytes:
            return "complete"
        return "body"


def _body_to_wait_for(head: bytes, limits: Limits) -> int:
    try:
        headers = http.client.parse_headers(io.BytesIO(head[head.index(b"\n") + 1 :]))
    except http.client.HTTPException:
        return 0  # the handler parses the head with the same parser and refuses it
    length = content_length(headers)
    # Without a length to trust, or over the limit, the handler answers without reading.
    return 0 if length is None or length > limits.max_body_bytes else length


class ReceivedRequestHandler(BaseHTTPRequestHandler):
    """A ``BaseHTTPRequestHandler`` over a request the server already received in full."""

    server: BoundedHTTPServer

    def setup(self) -> None:
        self.connection = self.request
        self.rfile = io.BytesIO(self.server.take_received(self.request))
        self.wfile = self.connection.makefile("wb")

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: the endpoints log outcomes themselves, structured."""


class BoundedHTTPServer(socketserver.BaseServer):
    """Serves ``handler`` on ``address`` within ``limits``. ``serve_forever`` in a thread of
    its own; ``shutdown`` then ``server_close`` to stop."""

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[ReceivedRequestHandler],
        limits: Limits,
        *,
        name: str,
    ) -> None:
        super().__init__(address, handler)
        self._handler = handler
        self.limits = limits
        self.name = name
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.socket.bind(address)
            self.socket.listen(128)
            self.socket.setblocking(False)
        except OSError:
            self.socket.close()
            raise
        host, port = self.socket.getsockname()
        self.server_address = (host, port)
        self._port = int(port)
        self._selector = selectors.DefaultSelector()
        self._pending: dict[socket.socket, _Pending] = {}  # in order of arrival
        self._lock = threading.Lock()  # guards the two below, shared with the workers
        self._received: dict[socket.socket, bytes] = {}
        self._busy = 0  # complete requests waiting for a worker or being answered
        self._work: SimpleQueue[tuple[socket.socket, tuple[str, int]] | None] = SimpleQueue()
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()
        self._dropped: Counter[str] = Counter()
        self._next_summary = 0.0
        self._accept_paused_until: float | None = None

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def port(self) -> int:
        return self._port

    @property
    def answering(self) -> int:
        """Complete requests waiting for a worker or being answered."""
        with self._lock:
            return self._busy

    def take_received(self, sock: socket.socket) -> bytes:
        """The request received on ``sock`` (a handler reads it once)."""
        with self._lock:
            return self._received.pop(sock, b"")

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        self._stopped.clear()
        for number in range(self.limits.workers):
            name = f"{self.name}-http-{number}"
            threading.Thread(target=self._work_loop, name=name, daemon=True).start()
        self._selector.register(self.socket, selectors.EVENT_READ)
        try:
            while not self._stop.is_set():
                try:
                    self._serve_once(poll_interval)
                except Exception:  # a bug here must not take the endpoint down with it
                    log.exception("http_server_failed", server=self.name)
        finally:
            for _ in range(self.limits.workers):
                self._work.put(None)
            self._stopped.set()

    def shutdown(self) -> None:
        self._stop.set()
        self._stopped.wait()

    def server_close(self) -> None:
        for pending in list(self._pending.values()):
            self._drop(pending, None)
        self._summarise(final=True)
        self._selector.close()
        self.socket.close()

    # --- the receiving thread -----------------------------------------------------------

    def _serve_once(self, poll_interval: float) -> None:
        for key, _ in self._selector.select(self._wait_s(poll_interval)):
            if key.fileobj is self.socket:
                self._accept()
            elif key.data.sock in self._pending:  # not displaced by an accept just now
                self._receive(key.data)
        self._expire()
        self._resume_accepting()
        self._summarise()

    def _wait_s(self, poll_interval: float) -> float:
        if not self._pending:
            return poll_interval
        oldest = next(iter(self._pending.values()))
        return max(0.0, min(poll_interval, oldest.deadline - time.monotonic()))

    def _accept(self) -> None:
        for _ in range(self.limits.max_connections):  # then the others' turn
            try:
                sock, address = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # EMFILE and the like: the process is out of something
                log.warning("http_accept_failed", server=self.name, error=str(err))
                self._selector.unregister(self.socket)
                self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S
                return
            if not self._make_room():
                self._dropped["refused"] += 1
                _answer_and_close(sock, HTTPStatus.SERVICE_UNAVAILABLE)
                continue
            sock.setblocking(False)
            deadline = time.monotonic() + self.limits.request_timeout_s
            pending = _Pending(sock, address, deadline)
            self._pending[sock] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _make_room(self) -> bool:
        with self._lock:
            busy = self._busy
        if len(self._pending) + busy < self.limits.max_connections:
            return True
        if not self._pending:
            return False
        self._dropped["displaced"] += 1
        self._drop(next(iter(self._pending.values())), HTTPStatus.SERVICE_UNAVAILABLE)
        return True

    def _receive(self, pending: _Pending) -> None:
        try:
            chunk = pending.sock.recv(65_536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(pending, None)
            return
        state = pending.feed(chunk, self.limits)
        if state == "too_large":
            self._dropped["too_large"] += 1
            self._drop(pending, HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE)
        elif state == "complete" or (not chunk and state == "body"):
            # A client that stopped sending mid-body is answered (short body), not dropped.
            self._dispatch(pending)
        elif not chunk:
            self._drop(pending, None)  # it left before its request was whole

    def _dispatch(self, pending: _Pending) -> None:
        self._forget(pending)
        sock = pending.sock
        try:
            sock.settimeout(self.limits.write_timeout_s)  # blocking again, for the worker
        except OSError:
            sock.close()
            return
        with self._lock:
            self._busy += 1
            self._received[sock] = bytes(pending.data)
        self._work.put((sock, pending.address))

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            oldest = next(iter(self._pending.values()))  # deadlines come in arrival order
            if oldest.deadline > now:
                return
            self._dropped["timed_out"] += 1
            self._drop(oldest, HTTPStatus.REQUEST_TIMEOUT)

    def _resume_accepting(self) -> None:
        paused = self._accept_paused_until
        if paused is not None and time.monotonic() >= paused:
            self._accept_paused_until = None
            self._selector.register(self.socket, selectors.EVENT_READ)

    def _summarise(self, *, final: bool = False) -> None:
        now = time.monotonic()
        if self._dropped and (final or now >= self._next_summary):
            log.warning("http_connections_dropped", server=self.name, **self._dropped)
            self._dropped.clear()
            self._next_summary = now + _SUMMARY_EVERY_S

    def _forget(self, pending: _Pending) -> None:
        del self._pending[pending.sock]
        self._selector.unregister(pending.sock)

    def _drop(self, pending: _Pending, status: HTTPStatus | None) -> None:
        self._forget(pending)
        if status is None:
            pending.sock.close()
        else:
            _answer_and_close(pending.sock, status)

    # --- the workers --------------------------------------------------------------------

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            sock, address = item
            try:
                self._handler(sock, address, self)
            except OSError:
                pass  # the client left while being answered: nothing to tell it
            except Exception:
                log.exception("http_request_failed", server=self.name)
            finally:
                with self._lock:
                    self._busy -= 1
                    self._received.pop(sock, None)
                _close(sock)


def _answer_and_close(sock: socket.socket, status: HTTPStatus) -> None:
    """A short answer from the receiving thread, which must never block on a client."""
    body = f"{_WHY[status]}\n".encode()
    head = (
        f"HTTP/1.0 {status.value} {status.phrase}\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    try:
        sock.setblocking(False)
        sock.send(head.encode() + body)  # a few bytes into an empty send buffer
        sock.shutdown(socket.SHUT_WR)
        # Read what the client sent meanwhile: closing with unread bytes resets the
        # connection, and the client may lose the answer.
        for _ in range(16):
            if not sock.recv(65_536):
                break
    except OSError:
        pass  # BlockingIOError ends the draining; anything else: the client is gone
    sock.close()


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_WR)  # the answer, then end of file: no reset
    sock.close()
