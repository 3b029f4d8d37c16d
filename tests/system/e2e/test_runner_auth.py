"""A CI token that lost its access (issue 15, item 3), with the daemon as a process.

A 403, or GitHub's 404 for a private repository the token cannot see, used to fail every
build at once as ``lost``. Now the runner is reported unhealthy (metric, /readyz, one log
line) and its builds keep being polled until the token works again or their deadline passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.daemon import DaemonProcess, World
from tests.support.scrape import get, ops_port, scrape
from tests.support.waiting import wait_until
from tests.system.e2e.ci_support import FakeCI, build, start_ci
from tests.system.e2e.test_ci_backends import BRISK_POLL, wait_polled, wait_terminal

MakeDaemon = Callable[..., DaemonProcess]

#: How each vendor refuses in these tests: GitHub hides a private repository behind 404s.
REFUSAL = {"github": (404, "Not Found"), "buildkite": (403, "Forbidden")}

MATRIX = pytest.mark.parametrize(
    ("kind", "backend_url"),
    [
        ("github", "sqlite"),
        pytest.param("github", "mysql", marks=pytest.mark.mysql),
        ("buildkite", "sqlite"),
    ],
    indirect=["backend_url"],
)


@pytest.fixture
def ci(kind: str) -> Iterator[FakeCI]:
    fake = start_ci(kind)
    yield fake
    fake.stop()


def _events(d: DaemonProcess, name: str) -> list[dict[str, object]]:
    return [e for e in d.events() if e.get("event") == name]


@MATRIX
def test_a_refused_token_keeps_the_build_alive_and_flips_readiness(
    kind: str, ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d = daemon(ci.runner_toml() + BRISK_POLL, env=ci.env()).start()
    port = ops_port(d)
    [request] = world.submit("main", 1)
    wait_polled(world, request, 1, "ACCEPTED")
    assert get(port, "/readyz").status_code == 200

    ci.fake.deny(*REFUSAL[kind])
    polls = build(world, request).polls
    wait_polled(world, request, polls + 4, "ACCEPTED")  # still polled, still not finished
    ready = get(port, "/readyz")
    assert ready.status_code == 503 and ready.text.startswith("runner ci: "), ready.text
    assert str(REFUSAL[kind][0]) in ready.text
    assert scrape(port).value("buildq_runner_healthy", runner="ci") == 0
    assert scrape(port).value("buildq_runner_calls_total", outcome="unauthorized") >= 4

    ci.fake.deny(None)
    build_id = build(world, request).build_id
    ci.set_running(build_id)
    ci.finish(build_id, passed=True)
    wait_terminal(world, 1)
    wait_until(lambda: get(port, "/readyz").status_code == 200, message="ready again")
    assert scrape(port).value("buildq_runner_healthy", runner="ci") == 1

    row = build(world, request)
    assert (row.status, row.failure_reason) == ("SUCCEEDED", None)
    assert len(_events(d, "runner_unauthorized")) == 1  # logged once, not once per poll
    assert len(_events(d, "runner_authorized")) == 1
    assert not _events(d, "delivery_nacked") and not _events(d, "handler_failed")
    assert world.dead_letters("buildsignal_dlq") == []
    assert ci.token not in d.log_text()
    assert d.stop() == 0


@pytest.mark.parametrize(("kind", "backend_url"), [("github", "sqlite")], indirect=["backend_url"])
def test_a_refused_build_fails_at_its_deadline_not_as_lost(
    kind: str, ci: FakeCI, daemon: MakeDaemon, world: World
) -> None:
    d = daemon(ci.runner_toml() + BRISK_POLL + "finish_by_s = 3\n", env=ci.env()).start()
    [request] = world.submit("main", 1)
    wait_polled(world, request, 1, "ACCEPTED")
    ci.fake.deny(*REFUSAL[kind])
    wait_terminal(world, 1)

    row = build(world, request)
    assert (row.status, row.failure_reason) == ("FAILED", "timeout")
    assert "finish_by_s=3" in row.error
    assert row.polls > 2
    assert d.stop() == 0
