"""The webhook receiver: signatures, replay window, size limit, and the BuildID it hands on."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import structlog

from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.contract import CORRELATION_KEY, BuildID, Change
from buildq.buildrunner.github import GitHubRunner
from buildq.config.base import ConfigError, Secret, Table
from buildq.webhook import WebhookConfig, WebhookRoute, WebhookServer, route_for
from tests.support.fakeci import FakeBuildkite, FakeGitHub
from tests.support.fakeci.buildkite import sign as bk_sign
from tests.support.fakeci.github import sign as gh_sign

BK_SECRET = "bk-webhook-SECRET-5b1c"
GH_SECRET = "gh-webhook-SECRET-77aa"
MAX_BODY = 4096


class Events:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: list[tuple[str, BuildID]] = []
        self.fail = False

    def __call__(self, runner_name: str, build_id: BuildID) -> None:
        if self.fail:
            raise RuntimeError("queue unavailable")
        with self.lock:
            self.seen.append((runner_name, build_id))


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def receiver(events: Events) -> Iterator[WebhookServer]:
    config = WebhookConfig(enabled=True, port=0, max_body_bytes=MAX_BODY, tolerance_s=300)
    routes = [
        WebhookRoute("ci", "buildkite", Secret(BK_SECRET, "env:BK")),
        WebhookRoute("gha", "github", Secret(GH_SECRET, "env:GH")),
    ]
    server = WebhookServer(config, routes, events)
    server.start()
    yield server
    server.stop()


def post(url: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(url, content=body, headers=headers, timeout=5)


def bk_headers(
    body: bytes, secret: str = BK_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    return {
        "X-Buildkite-Event": "build.finished",
        "X-Buildkite-Signature": bk_sign(body, secret, timestamp),
    }


def test_buildkite_delivery_names_the_triggered_build(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner, receiver: WebhookServer, events: Events
) -> None:
    build_id = bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    bk.set_state(1, "passed")

    response = bk.send_webhook(f"{receiver.url}/webhooks/ci", BK_SECRET, 1)

    assert response.status_code == 202
    assert events.seen == [("ci", build_id)]


def test_github_delivery_names_the_triggered_attempt(
    gh: FakeGitHub, gh_runner: GitHubRunner, receiver: WebhookServer, events: Events
) -> None:
    build_id = gh_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    run_id = gh.dispatched_runs()[0].id
    gh.set_status(run_id, "completed", "success")

    assert gh.send_webhook(f"{receiver.url}/webhooks/gha", GH_SECRET, run_id).status_code == 202
    gh.rerun(run_id)
    assert gh.send_webhook(f"{receiver.url}/webhooks/gha", GH_SECRET, run_id).status_code == 202

    assert events.seen == [("gha", build_id), ("gha", BuildID(f"gh:octo/app/{run_id}/2"))]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-Buildkite-Token": BK_SECRET},
        {"X-Buildkite-Signature": "garbage"},
        {"X-Buildkite-Signature": "timestamp=,signature=abc"},
    ],
    ids=["missing", "token-only", "garbage", "empty-timestamp"],
)
def test_buildkite_unsigned_or_malformed_is_401(
    receiver: WebhookServer, events: Events, headers: dict[str, str]
) -> None:
    body = b'{"event":"build.finished","build":{}}'
    response = post(
        f"{receiver.url}/webhooks/ci", body, {"X-Buildkite-Event": "build.finished", **headers}
    )
    assert response.status_code == 401
    assert events.seen == []


def test_buildkite_wrong_secret_or_tampered_body_is_401(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner, receiver: WebhookServer, events: Events
) -> None:
    bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    body = bk.webhook_payload(1)
    url = f"{receiver.url}/webhooks/ci"
    assert post(url, body, bk_headers(body, secret="not-the-secret")).status_code == 401
    tampered = body.replace(b'"number": 1', b'"number": 2')
    assert post(url, tampered, bk_headers(body)).status_code == 401
    assert events.seen == []


def test_buildkite_replay_outside_tolerance_is_401(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner, receiver: WebhookServer, events: Events
) -> None:
    bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    body = bk.webhook_payload(1)
    url = f"{receiver.url}/webhooks/ci"
    now = int(time.time())

    assert post(url, body, bk_headers(body, timestamp=now - 400)).status_code == 401
    assert post(url, body, bk_headers(body, timestamp=now + 400)).status_code == 401
    assert events.seen == []
    assert post(url, body, bk_headers(body, timestamp=now - 200)).status_code == 202
    assert len(events.seen) == 1


@pytest.mark.parametrize(
    "signature",
    [None, "sha256=" + "0" * 64, gh_sign(b"other body", GH_SECRET), gh_sign(b"{}", "wrong")],
    ids=["missing", "zeros", "other-body", "wrong-secret"],
)
def test_github_bad_signatures_are_401(
    receiver: WebhookServer, events: Events, signature: str | None
) -> None:
    body = b"{}"
    headers = {"X-GitHub-Event": "workflow_run"}
    if signature:
        headers["X-Hub-Signature-256"] = signature
    assert post(f"{receiver.url}/webhooks/gha", body, headers).status_code == 401
    assert events.seen == []


def test_oversize_body_is_413_and_nothing_happens(receiver: WebhookServer, events: Events) -> None:
    body = json.dumps({"build": {"url": "x" * MAX_BODY}}).encode()
    response = post(f"{receiver.url}/webhooks/ci", body, bk_headers(body))
    assert response.status_code == 413
    assert events.seen == []


def test_413_is_decided_from_content_length_before_reading(receiver: WebhookServer) -> None:
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as conn:
        conn.sendall(b"POST /webhooks/ci HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n")
        reply = conn.recv(4096)
    assert reply.startswith(b"HTTP/1.0 413") or reply.startswith(b"HTTP/1.1 413")


def test_missing_content_length_is_411(receiver: WebhookServer) -> None:
    with socket.create_connection(("127.0.0.1", receiver.port), timeout=5) as conn:
        conn.sendall(b"POST /webhooks/ci HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = conn.recv(4096)
    assert b" 411 " in reply.split(b"\r\n", 1)[0]


def test_malformed_json_in_a_signed_body_is_400(receiver: WebhookServer, events: Events) -> None:
    body = b"{not json"
    assert post(f"{receiver.url}/webhooks/ci", body, bk_headers(body)).status_code == 400
    headers = {"X-GitHub-Event": "workflow_run", "X-Hub-Signature-256": gh_sign(body, GH_SECRET)}
    assert post(f"{receiver.url}/webhooks/gha", body, headers).status_code == 400
    assert events.seen == []


def test_signed_event_without_a_build_is_400(receiver: WebhookServer, events: Events) -> None:
    body = json.dumps({"event": "build.finished", "build": {"number": 3}}).encode()
    assert post(f"{receiver.url}/webhooks/ci", body, bk_headers(body)).status_code == 400
    assert events.seen == []


@pytest.mark.parametrize("event", ["ping", "job.finished", "agent.connected"])
def test_other_signed_events_are_acknowledged_and_ignored(
    receiver: WebhookServer, events: Events, event: str
) -> None:
    body = json.dumps({"event": event}).encode()
    headers = {"X-Buildkite-Event": event, "X-Buildkite-Signature": bk_sign(body, BK_SECRET)}
    assert post(f"{receiver.url}/webhooks/ci", body, headers).status_code == 200
    gh_headers = {"X-GitHub-Event": "ping", "X-Hub-Signature-256": gh_sign(body, GH_SECRET)}
    assert post(f"{receiver.url}/webhooks/gha", body, gh_headers).status_code == 200
    assert events.seen == []


def test_unknown_path_and_wrong_method(receiver: WebhookServer, events: Events) -> None:
    body = b"{}"
    assert post(f"{receiver.url}/webhooks/nobody", body, bk_headers(body)).status_code == 404
    assert post(f"{receiver.url}/hooks/ci", body, bk_headers(body)).status_code == 404
    assert httpx.get(f"{receiver.url}/webhooks/ci", timeout=5).status_code == 405
    assert events.seen == []


def test_callback_failure_is_500_and_logged(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner, receiver: WebhookServer, events: Events
) -> None:
    bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    events.fail = True
    with structlog.testing.capture_logs() as logs:
        response = bk.send_webhook(f"{receiver.url}/webhooks/ci", BK_SECRET, 1)
    assert response.status_code == 500
    assert [e["event"] for e in logs if e["log_level"] == "error"] == ["webhook_callback_failed"]


def test_secrets_never_reach_logs_or_responses(
    bk: FakeBuildkite,
    bk_runner: BuildkiteRunner,
    receiver: WebhookServer,
    events: Events,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("DEBUG")
    bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    body = bk.webhook_payload(1)
    url = f"{receiver.url}/webhooks/ci"
    with structlog.testing.capture_logs() as logs:
        responses = [
            post(url, body, bk_headers(body)),
            post(url, body, bk_headers(body, secret="wrong")),
            post(url, body, bk_headers(body, timestamp=1)),
            post(url, b"x" * (MAX_BODY + 1), bk_headers(b"")),
        ]
    text = repr(logs) + caplog.text + "".join(r.text + repr(r.headers) for r in responses)
    assert [r.status_code for r in responses] == [202, 401, 401, 413]
    assert BK_SECRET not in text and GH_SECRET not in text
    assert {e.get("reason") for e in logs if e["event"] == "webhook_rejected"} == {
        "bad_signature",
        "stale_timestamp",
        "too_large",
    }


def test_config_from_table_and_routes(monkeypatch: pytest.MonkeyPatch, bk: FakeBuildkite) -> None:
    defaults = WebhookConfig.from_table(Table("webhooks", {}))
    assert (defaults.enabled, defaults.bind, defaults.tolerance_s) == (False, "127.0.0.1", 300.0)
    table = Table(
        "webhooks", {"enabled": True, "port": 9000, "max_body_bytes": 65536, "tolerance_s": 60}
    )
    config = WebhookConfig.from_table(table)
    table.reject_unknown()
    assert (config.enabled, config.port, config.max_body_bytes, config.tolerance_s) == (
        True,
        9000,
        65536,
        60.0,
    )
    with pytest.raises(ConfigError, match=r"webhooks\.port"):
        WebhookConfig.from_table(Table("webhooks", {"port": 70000}))

    from buildq.buildrunner.buildkite import BuildkiteConfig
    from tests.integration.runners.conftest import BK_TOKEN_ENV, buildkite_table

    monkeypatch.setenv(BK_TOKEN_ENV, bk.token)
    monkeypatch.setenv("BUILDQ_TEST_HOOK_SECRET", BK_SECRET)
    plain = BuildkiteConfig.from_table(buildkite_table(bk))
    hooked = BuildkiteConfig.from_table(
        buildkite_table(bk, webhook_secret_env="BUILDQ_TEST_HOOK_SECRET")
    )
    assert route_for("ci", plain) is None
    route = route_for("ci", hooked)
    assert route is not None and (route.runner_name, route.kind) == ("ci", "buildkite")
    assert BK_SECRET not in repr(route) and BK_SECRET not in repr(hooked)
    with pytest.raises(ValueError, match="cannot be a webhook path"):
        WebhookRoute("a/b", "github", Secret("s", "env:X"))


def test_a_webhook_port_in_use_is_a_config_error_naming_the_key(events: Events) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = WebhookServer(WebhookConfig(enabled=True, port=port), [], events)
        with pytest.raises(ConfigError, match=rf"webhooks\.port = {port}: .*in use"):
            server.start()
