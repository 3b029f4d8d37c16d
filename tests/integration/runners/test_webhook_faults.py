"""The webhook receiver against clients that misbehave: an answer or one log line, never a
traceback (issue 14, item 7).

Before, a Content-Length of thousands of digits (``int()`` refuses more than 4300) or a
non-ASCII digit (``"²".isdigit()`` is true) raised in the handler thread, and a client that hung
up before its answer made the write raise: each printed a traceback on stderr and the client
got no answer.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator

import pytest
from structlog.testing import capture_logs

from buildq.buildrunner.contract import BuildID
from buildq.config.base import Secret
from buildq.webhook import WebhookConfig, WebhookRoute, WebhookServer
from tests.support.fakeci.buildkite import sign
from tests.support.waiting import wait_until

SECRET = "bk-webhook-SECRET-faults"
BUILD_URL = "https://api.buildkite.com/v2/organizations/acme/pipelines/app/builds/7"


class Gate:
    """An ``on_build_event`` that holds each delivery until the test lets it go."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.seen: list[BuildID] = []

    def __call__(self, runner_name: str, build_id: BuildID) -> None:
        self.seen.append(build_id)
        self.entered.set()
        self.release.wait(60)


@pytest.fixture
def gate() -> Iterator[Gate]:
    gate = Gate()
    yield gate
    gate.release.set()


@pytest.fixture
def receiver(gate: Gate) -> Iterator[WebhookServer]:
    config = WebhookConfig(enabled=True, port=0, max_body_bytes=4096)
    route = WebhookRoute("ci", "buildkite", Secret(SECRET, "env:BK"))
    server = WebhookServer(config, [route], gate)
    server.start()
    yield server
    server.stop()


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` and read the answer until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65_536):
            answer += chunk
    return answer


def signed_delivery() -> bytes:
    body = json.dumps({"event": "build.finished", "build": {"url": BUILD_URL}}).encode()
    head = (
        "POST /webhooks/ci HTTP/1.1\r\nHost: buildq\r\nContent-Type: application/json\r\n"
        "X-Buildkite-Event: build.finished\r\n"
        f"X-Buildkite-Signature: {sign(body, SECRET)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@pytest.mark.parametrize(
    ("length", "status", "reason"),
    [
        (b"9" * 5000, b"413", "too_large"),
        (b"1" + b"0" * 30, b"413", "too_large"),
        (b"\xb2", b"411", "length_required"),  # "²" in Latin-1, how header values are decoded
        (b"\xd9\xa3", b"411", "length_required"),  # an Arabic-Indic 3, as UTF-8 bytes
        (b"-1", b"411", "length_required"),
    ],
    ids=["thousands-of-digits", "huge", "superscript-two", "arabic-indic", "negative"],
)
def test_a_content_length_no_one_means_is_answered_not_a_traceback(
    receiver: WebhookServer,
    gate: Gate,
    capfd: pytest.CaptureFixture[str],
    length: bytes,
    status: bytes,
    reason: str,
) -> None:
    request = b"POST /webhooks/ci HTTP/1.1\r\nHost: buildq\r\nContent-Length: " + length
    with capture_logs() as logs:
        answer = exchange(receiver.port, request + b"\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.0 " + status), answer[:200]
    assert [e["reason"] for e in logs if e["event"] == "webhook_rejected"] == [reason]
    assert "Traceback" not in capfd.readouterr().err
    assert gate.seen == []


def test_a_client_that_hangs_up_before_the_answer_is_one_log_line(
    receiver: WebhookServer, gate: Gate, capfd: pytest.CaptureFixture[str]
) -> None:
    with capture_logs() as logs:
        sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=30)
        sock.sendall(signed_delivery())
        assert gate.entered.wait(30), "the delivery reached the daemon's callback"
        # Hang up with a reset, as a client that gave up does: the answer has nowhere to go.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
        gate.release.set()
        gone = wait_until(
            lambda: [e for e in logs if e["event"] == "webhook_client_gone"],
            timeout=30,
            message="webhook_client_gone",
        )
        # The server is still there for the next client.
        answer = exchange(receiver.port, signed_delivery())
    assert answer.startswith(b"HTTP/1.0 202"), answer[:200]
    assert gone == [
        {
            "event": "webhook_client_gone",
            "log_level": "info",
            "runner": "ci",
            "status": 202,
            "error": gone[0]["error"],
        }
    ]
    assert gone[0]["error"] in ("BrokenPipeError", "ConnectionResetError")
    assert not [e for e in logs if e["log_level"] in ("error", "critical")]
    assert gate.seen == [BuildID("bk:acme/app/7")] * 2
    assert "Traceback" not in capfd.readouterr().err
