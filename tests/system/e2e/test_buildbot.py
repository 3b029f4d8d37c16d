"""``buildq run`` against a real Buildbot master and worker (from PyPI, on 127.0.0.1).

Nothing here is a fake: the daemon is a process, the runner speaks to Buildbot's REST API,
the worker runs the builder's shell step. One master serves the whole session (its start-up
is the cost; see ``buildbot_master``); each test reads its outcome from buildq's database
and from Buildbot's own API. Slow: ``make test-fast`` skips it, ``make test`` and CI run it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import pytest

from buildq.buildrunner.buildbot import BuildbotRunner
from buildq.buildrunner.contract import CORRELATION_KEY, BuildStatus, Change
from tests.support.buildbot import BuildbotMaster
from tests.support.daemon import DaemonProcess, World
from tests.support.waiting import wait_until
from tests.system.e2e.ci_support import build, cli, cli_json
from tests.system.e2e.test_ci_backends import assert_one_chain_each, wait_polled, wait_terminal

pytestmark = pytest.mark.slow

MakeDaemon = Callable[..., DaemonProcess]


CONFIG = """
[runners.bb]
type = "buildbot"
api_url = "{url}"
builder = "buildq"
connect_timeout_s = 2.0
read_timeout_s = 10.0
retry_backoff_s = 0.1
retry_max_backoff_s = 0.5
lookup_interval_s = 0.2

[queues.main]
runner = "bb"

[queues.main.poll]
accepted_interval_s = 0.3
running_interval_s = 0.3
growth = 1.0
max_interval_s = 0.3
jitter = 0.0

[queues.slow]
runner = "bb"

[queues.slow.poll]
accepted_interval_s = 0.3
running_interval_s = 0.3
growth = 1.0
max_interval_s = 0.3
jitter = 0.0
finish_by_s = 5.0

# A master restart refuses connections for seconds: polls and triggers wait it out.
[consumer.topics.build]
max_attempts = 100

[consumer.topics.buildsignal]
max_attempts = 100
"""


@pytest.fixture
def tag() -> str:
    """For request ids: the session's master outlives each test's database, and a request id
    it has seen before is (rightly) answered with that earlier build."""
    return secrets.token_hex(3)


def buildsets_of(buildbot: BuildbotMaster, request_id: str) -> list[dict[str, Any]]:
    """The Buildbot buildsets forced for this build request (its reason names it)."""
    answer = buildbot.get("/buildsets?order=-bsid&limit=500")
    assert isinstance(answer, dict)
    return [b for b in answer["buildsets"] if b["reason"].endswith(f"buildq {request_id}")]


def status_of(world: World, request_id: str) -> str | None:
    rows = world.rows("SELECT status FROM builds WHERE request_id = :r", r=request_id)
    return str(rows[0].status) if rows else None


def request_results(buildbot: BuildbotMaster, build_id: str) -> int:
    answer = buildbot.get(f"/buildrequests/{build_id.removeprefix('bb:')}")
    assert isinstance(answer, dict)
    [request] = answer["buildrequests"]
    return int(request["results"])


def buildbot_builds(buildbot: BuildbotMaster, build_id: str) -> list[dict[str, Any]]:
    answer = buildbot.get(f"/buildrequests/{build_id.removeprefix('bb:')}/builds")
    assert isinstance(answer, dict)
    return list(answer["builds"])


def test_a_retried_trigger_returns_the_first_build(
    bb_runner: BuildbotRunner, buildbot: BuildbotMaster, tag: str
) -> None:
    request_id = f"again-{tag}"
    metadata = {CORRELATION_KEY: request_id}
    first = bb_runner.trigger("main", [], [Change(f"c-{request_id}")], metadata)
    assert bb_runner.trigger("main", [], [Change(f"c-{request_id}")], metadata) == first
    assert len(buildsets_of(buildbot, request_id)) == 1
    wait_until(lambda: bb_runner.status(first)[0] is BuildStatus.SUCCEEDED, timeout=60)


def test_builds_pass_fail_get_cancelled_and_hit_their_deadline(
    buildbot: BuildbotMaster, daemon: MakeDaemon, world: World, tag: str
) -> None:
    d = daemon(CONFIG.format(url=buildbot.url)).start()
    [passes] = world.submit("main", 1, prefix=f"pass-{tag}")
    [fails] = world.submit("main", 1, prefix=f"fail-{tag}")
    [cancels] = world.submit("main", 1, prefix=f"hang-{tag}")
    [late] = world.submit("slow", 1, prefix=f"hang-late-{tag}")

    wait_polled(world, cancels, 2, "RUNNING")
    cli(d.config, "cancel", build(world, cancels).build_id)
    wait_terminal(world, 4, timeout=60)

    outcomes = {r.request_id: (r.status, r.failure_reason) for r in world.builds()}
    assert outcomes == {
        passes: ("SUCCEEDED", None),
        fails: ("FAILED", "verdict"),
        cancels: ("CANCELLED", "cancelled"),
        late: ("FAILED", "timeout"),
    }
    assert_one_chain_each(world)
    for request_id in (passes, fails, cancels, late):
        assert len(buildsets_of(buildbot, request_id)) == 1, request_id
    # Buildbot itself saw the cancel and the deadline's cancel (6 = CANCELLED).
    for request_id, code in ((passes, 0), (fails, 2), (cancels, 6), (late, 6)):
        assert request_results(buildbot, build(world, request_id).build_id) == code, request_id
    shown = cli_json(d.config, "builds", "show", passes)
    assert shown["metadata"]["native_state"] == "success"
    assert shown["metadata"]["url"].startswith(buildbot.url)
    assert d.stop() == 0


def test_a_master_that_dies_mid_build_and_restarts_loses_nothing(
    buildbot: BuildbotMaster, daemon: MakeDaemon, world: World, tag: str
) -> None:
    d = daemon(CONFIG.format(url=buildbot.url)).start()
    [held] = world.submit("main", 1, prefix=f"hold-{tag}")
    wait_polled(world, held, 2, "RUNNING")

    buildbot.kill_master()
    # Asked for while the master is down: triggered once it is back, exactly once.
    [meanwhile] = world.submit("main", 1, prefix=f"pass-meanwhile-{tag}")
    wait_until(
        lambda: any(e.get("event") == "runner_request_retry" for e in d.events()),
        timeout=30,
        message="the daemon meeting the stopped master",
    )
    buildbot.start()

    wait_until(
        lambda: status_of(world, meanwhile) == "SUCCEEDED",
        timeout=90,
        message="the build requested during the restart",
    )
    assert status_of(world, held) in ("ACCEPTED", "RUNNING")
    (buildbot.release_dir / held).touch()
    wait_terminal(world, 2, timeout=90)

    assert {r.request_id: r.status for r in world.builds()} == {
        held: "SUCCEEDED",
        meanwhile: "SUCCEEDED",
    }
    assert_one_chain_each(world)
    for request_id in (held, meanwhile):
        assert len(buildsets_of(buildbot, request_id)) == 1, request_id
    # The interrupted build was retried by Buildbot under the same request (5 = RETRY).
    results = [b["results"] for b in buildbot_builds(buildbot, build(world, held).build_id)]
    assert results[0] == 5 and results[-1] == 0, results
    assert world.dead_letters("buildsignal_dlq") == [] and world.dead_letters("build_dlq") == []
    assert d.stop() == 0
