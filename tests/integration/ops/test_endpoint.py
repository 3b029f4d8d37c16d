"""The ops endpoint in-process: what a scrape and a HEAD probe get (issue 15, item 9)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from buildq.metrics import Metrics
from buildq.orchestrator.http import OpsServer


@pytest.fixture
def endpoint() -> Iterator[tuple[str, Metrics]]:
    metrics = Metrics()
    server = OpsServer("127.0.0.1", 0, metrics, lambda: (True, "ok"), lambda: (False, "starting"))
    server.start()
    yield f"http://127.0.0.1:{server.port}", metrics
    server.stop()


def test_no_created_series(endpoint: tuple[str, Metrics]) -> None:
    url, metrics = endpoint
    metrics.observe_runner_call("ci", "status", "ok", 0.1)
    metrics.observe_build_finished("SUCCEEDED", None, 12.0, 3)
    text = httpx.get(f"{url}/metrics", timeout=5).text
    assert "buildq_runner_calls_total{" in text
    assert "_created" not in text


@pytest.mark.parametrize(
    ("path", "status"), [("/metrics", 200), ("/healthz", 200), ("/readyz", 503)]
)
def test_head_is_answered_like_get_without_a_body(
    endpoint: tuple[str, Metrics], path: str, status: int
) -> None:
    url, _ = endpoint
    get = httpx.get(url + path, timeout=5)
    head = httpx.head(url + path, timeout=5)
    assert head.status_code == get.status_code == status
    assert head.headers["Content-Type"] == get.headers["Content-Type"]
    assert int(head.headers["Content-Length"]) > 0 and head.content == b""
