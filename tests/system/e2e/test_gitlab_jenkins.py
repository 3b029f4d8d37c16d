"""``buildq run`` against the fake GitLab and Jenkins: verdicts, cancel and the deadline.

The runners' own tests (tests/integration/runners) cover their faults; this checks the daemon drives
them end to end, including the deadline's cancel reaching the service.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.support.daemon import DaemonProcess, World
from tests.support.fakeci.gitlab import FakeGitLab
from tests.support.fakeci.jenkins import FakeJenkins
from tests.system.e2e.ci_support import build, canary, cli
from tests.system.e2e.test_ci_backends import assert_one_chain_each, wait_polled, wait_terminal

POLL = """
accepted_interval_s = 0.2
running_interval_s = 0.2
growth = 1.0
max_interval_s = 0.2
jitter = 0.0
"""

CONFIG = f"""
[runners.gl]
type = "gitlab"
api_url = "{{gitlab}}/api/v4"
project = "acme/app"
token_env = "BUILDQ_E2E_GITLAB_TOKEN"
retry_backoff_s = 0.05

[runners.jk]
type = "jenkins"
api_url = "{{jenkins}}"
job = "folder/app-merge"
user = "buildq-bot"
token_env = "BUILDQ_E2E_JENKINS_TOKEN"
retry_backoff_s = 0.05

[queues.gl]
runner = "gl"
[queues.gl.poll]
{POLL}
finish_by_s = 6.0

[queues.jk]
runner = "jk"
[queues.jk.poll]
{POLL}
finish_by_s = 6.0
"""


@pytest.fixture
def services() -> Iterator[tuple[FakeGitLab, FakeJenkins]]:
    with FakeGitLab(token=canary("gitlab")) as gl, FakeJenkins(token=canary("jenkins")) as jk:
        yield gl, jk


def test_gitlab_and_jenkins_builds_reach_their_verdicts_and_deadlines(
    services: tuple[FakeGitLab, FakeJenkins], daemon: Callable[..., DaemonProcess], world: World
) -> None:
    gl, jk = services
    env = {"BUILDQ_E2E_GITLAB_TOKEN": gl.token, "BUILDQ_E2E_JENKINS_TOKEN": jk.token}
    d = daemon(CONFIG.format(gitlab=gl.url, jenkins=jk.url), env=env).start()
    gl_pass, gl_fail, gl_cancel, gl_late = world.submit("gl", 4, prefix="gl")
    jk_pass, jk_fail, jk_cancel, jk_late = world.submit("jk", 4, prefix="jk")
    for request in (gl_pass, gl_fail, gl_cancel, gl_late, jk_pass, jk_fail, jk_cancel, jk_late):
        wait_polled(world, request, 1, "ACCEPTED")

    pipelines = {p.variables["BUILDQ_REQUEST_ID"]: p.id for p in gl.pipelines()}
    items = {i.parameters["BUILDQ_REQUEST_ID"]: i.id for i in jk.items()}
    for request in (gl_pass, gl_fail, gl_cancel):
        gl.set_status(pipelines[request], "running")
    numbers = {r: jk.start_build(items[r]) for r in (jk_pass, jk_fail, jk_cancel)}
    for request in (gl_cancel, jk_cancel):
        wait_polled(world, request, 2, "RUNNING")
        cli(d.config, "cancel", build(world, request).build_id)
    gl.set_status(pipelines[gl_pass], "success")
    gl.set_status(pipelines[gl_fail], "failed")
    jk.finish(numbers[jk_pass], "SUCCESS")
    jk.finish(numbers[jk_fail], "UNSTABLE")
    wait_terminal(world, 8, timeout=40)

    outcomes = {r.request_id: (r.status, r.failure_reason) for r in world.builds()}
    assert outcomes == {
        gl_pass: ("SUCCEEDED", None),
        gl_fail: ("FAILED", "verdict"),
        gl_cancel: ("CANCELLED", "cancelled"),
        gl_late: ("FAILED", "timeout"),
        jk_pass: ("SUCCEEDED", None),
        jk_fail: ("FAILED", "verdict"),
        jk_cancel: ("CANCELLED", "cancelled"),
        jk_late: ("FAILED", "timeout"),
    }
    assert_one_chain_each(world)
    # The cancels and the deadlines reached the services: one pipeline or item per request.
    assert gl.pipeline(pipelines[gl_late]).status == "canceled"
    assert gl.pipeline(pipelines[gl_cancel]).status == "canceled"
    assert next(i for i in jk.items() if i.id == items[jk_late]).cancelled
    assert next(b for b in jk.builds() if b.number == numbers[jk_cancel]).result == "ABORTED"
    assert len(gl.pipelines()) == 4 and len(jk.items()) == 4
    assert d.stop() == 0
