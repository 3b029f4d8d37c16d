"""``buildq.httpserver`` in-process: framing, limits, and what a client gets at each one."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from email.message import Message

import pytest

from buildq.httpserver import (
    TOO_LONG,
    BoundedHTTPServer,
    Limits,
    ReceivedRequestHandler,
    content_length,
)
from tests.support.waiting import wait_until

LIMITS = Limits(max_connections=4, request_timeout_s=30, workers=1, max_body_bytes=100)


class Echo(ReceivedRequestHandler):
    """Answers with the body it got; holds the answer while ``gate`` is closed."""

    gate = threading.Event()
    entered = threading.Event()

    def do_POST(self) -> None:
        self.entered.set()
        self.gate.wait(30)
        body = self.rfile.read(content_length(self.headers) or 0)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def server() -> Iterator[BoundedHTTPServer]:
    Echo.gate.set()
    Echo.entered.clear()
    httpd = BoundedHTTPServer(("127.0.0.1", 0), Echo, LIMITS, name="test")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield httpd
    Echo.gate.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


def connect(server: BoundedHTTPServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=30)


def read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65_536):
        answer += chunk
    sock.close()
    return answer


def headers(**values: str) -> Message:
    message = Message()
    for name, value in values.items():
        message[name.replace("_", "-")] = value
    return message


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ({"Content_Length": "12"}, 12),
        ({"Content_Length": " 007 "}, 7),
        ({"Content_Length": "9" * 5000}, TOO_LONG),
        ({"Content_Length": "0" * 5000 + "5"}, 5),
        ({"Content_Length": "²"}, None),
        ({"Content_Length": "-1"}, None),
        ({"Content_Length": "1e3"}, None),
        ({"Content_Length": "12", "Transfer_Encoding": "chunked"}, None),
        ({}, None),
    ],
)
def test_content_length(given: dict[str, str], expected: int | None) -> None:
    assert content_length(headers(**given)) == expected


def test_a_request_in_one_byte_pieces_is_put_together(server: BoundedHTTPServer) -> None:
    sock = connect(server)
    for byte in b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello":
        sock.sendall(bytes([byte]))
    answer = read_all(sock)
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"\r\n\r\nhello")


def test_a_head_over_64_kib_is_431(server: BoundedHTTPServer) -> None:
    sock = connect(server)
    sock.sendall(b"POST / HTTP/1.0\r\nX-Big: " + b"a" * 70_000)
    assert read_all(sock).startswith(b"HTTP/1.0 431")


def test_a_body_over_the_limit_is_not_waited_for(server: BoundedHTTPServer) -> None:
    sock = connect(server)
    sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 101\r\n\r\nabc")
    answer = read_all(sock)  # the handler reads what there is: the limit is the endpoint's
    assert answer.startswith(b"HTTP/1.0 200") and answer.endswith(b"abc")


def test_when_every_connection_is_being_answered_a_new_one_gets_503(
    server: BoundedHTTPServer,
) -> None:
    Echo.gate.clear()
    busy = [connect(server) for _ in range(LIMITS.max_connections)]
    for sock in busy:
        sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 1\r\n\r\nx")
    assert Echo.entered.wait(30)
    # One is in the worker, the others wait for it: none can be displaced.
    wait_until(lambda: server.answering == LIMITS.max_connections, timeout=30)
    refused = connect(server)
    refused.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert read_all(refused).startswith(b"HTTP/1.0 503")
    Echo.gate.set()
    assert all(read_all(sock).startswith(b"HTTP/1.0 200") for sock in busy)


def test_at_the_cap_the_slowest_connection_makes_room(server: BoundedHTTPServer) -> None:
    slow = [connect(server) for _ in range(LIMITS.max_connections)]
    for sock in slow:
        sock.sendall(b"POST / HTTP/1.0\r\n")  # and nothing more
    fresh = connect(server)
    fresh.sendall(b"POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nok")
    assert read_all(fresh).endswith(b"ok")
    assert read_all(slow[0]).startswith(b"HTTP/1.0 503")  # the oldest made room
    for sock in slow[1:]:
        sock.close()


def test_a_request_not_whole_in_time_is_408() -> None:
    limits = Limits(max_connections=4, request_timeout_s=0.5, workers=1, max_body_bytes=100)
    httpd = BoundedHTTPServer(("127.0.0.1", 0), Echo, limits, name="test")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        sock = connect(httpd)
        sock.sendall(b"POST / HTTP/1.0\r\nContent-Length: 10\r\n\r\nabc")
        assert read_all(sock).startswith(b"HTTP/1.0 408")
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)
