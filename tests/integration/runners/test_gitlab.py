"""The GitLab runner against a fake GitLab API on 127.0.0.1: pipelines, mapping, faults."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest
import structlog

from buildq.buildrunner import registry
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerError,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.buildrunner.gitlab import GitLabRunner, rate_signal
from buildq.config.base import ConfigError, Table
from buildq.webhook import WebhookConfig, WebhookServer, route_for
from tests.integration.runners.conftest import GL_TOKEN_ENV, gitlab_table, pipeline_id
from tests.support.fakeci import Fault
from tests.support.fakeci.gitlab import FakeGitLab

MakeRunner = Callable[..., GitLabRunner]
HEAD = [Change("change-1", "abc123")]


def test_trigger_creates_one_pipeline_with_the_changes_as_variables(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner(ref="merge-queue")
    build_id = runner.trigger("main", [Change("b", "r0")], HEAD, {CORRELATION_KEY: "req-1"})
    [pipeline] = gl.pipelines()
    assert build_id == BuildID(f"gl:{gl.project_id}/{pipeline.id}")
    assert (pipeline.ref, pipeline.source, pipeline.name) == ("merge-queue", "api", "buildq req-1")
    assert pipeline.variables["BUILDQ_REQUEST_ID"] == "req-1"
    assert pipeline.variables["BUILDQ_HEAD"] == '[{"id":"change-1","revision":"abc123","extra":{}}]'
    # The project was addressed by its URL-encoded path, as configured.
    [create] = gl.requests_matching("POST", "/pipeline")
    assert create.path == "/api/v4/projects/acme%2Fapp/pipeline"
    # A retried trigger (same request id) finds that pipeline instead of creating another.
    assert runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-1"}) == build_id
    assert len(gl.pipelines()) == 1


@pytest.mark.parametrize(
    ("state", "expected", "reason"),
    [
        ("created", BuildStatus.ACCEPTED, None),
        ("waiting_for_resource", BuildStatus.ACCEPTED, None),
        ("waiting_for_callback", BuildStatus.ACCEPTED, None),
        ("preparing", BuildStatus.ACCEPTED, None),
        ("pending", BuildStatus.ACCEPTED, None),
        ("scheduled", BuildStatus.ACCEPTED, None),
        ("running", BuildStatus.RUNNING, None),
        ("canceling", BuildStatus.RUNNING, None),
        ("success", BuildStatus.SUCCEEDED, None),
        ("failed", BuildStatus.FAILED, "verdict"),
        ("canceled", BuildStatus.CANCELLED, None),
        ("skipped", BuildStatus.FAILED, "infra"),
        ("manual", BuildStatus.FAILED, "verdict"),
        ("some_future_state", BuildStatus.UNKNOWN, None),
    ],
)
def test_every_pipeline_status_is_mapped(
    gl: FakeGitLab,
    make_gl_runner: MakeRunner,
    state: str,
    expected: BuildStatus,
    reason: str | None,
) -> None:
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-map"})
    gl.set_status(pipeline_id(build_id), state)
    status, meta = runner.status(build_id)
    assert (status, meta.get("failure_reason"), meta["native_state"]) == (expected, reason, state)
    assert meta["url"].endswith(f"/-/pipelines/{pipeline_id(build_id)}")


def test_manual_can_count_as_running_and_a_started_scheduled_pipeline_runs(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner(manual_as="running")
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-manual"})
    gl.set_status(pipeline_id(build_id), "manual")
    assert runner.status(build_id)[0] is BuildStatus.RUNNING
    gl.set_status(pipeline_id(build_id), "scheduled")  # started_at is set by now
    assert runner.status(build_id)[0] is BuildStatus.RUNNING


def test_trigger_token_creates_through_the_trigger_endpoint_and_stays_secret(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner(trigger_token_env="BUILDQ_TEST_GITLAB_TRIGGER_TOKEN")
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-t"})
    [pipeline] = gl.pipelines()
    assert (pipeline.source, pipeline.variables["BUILDQ_REQUEST_ID"]) == ("trigger", "req-t")
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    # GitLab's refusal quotes the token: buildq's error must not.
    gl.inject(
        Fault(
            status=400, method="POST", path="/trigger", body={"message": f"bad {gl.trigger_token}"}
        )
    )
    with pytest.raises(RunnerError) as refused:
        runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-t2"})
    assert gl.trigger_token not in str(refused.value) and "<redacted>" in str(refused.value)


def test_a_refused_trigger_token_is_not_quoted_in_the_error_nor_its_summary(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner(trigger_token_env="BUILDQ_TEST_GITLAB_TRIGGER_TOKEN")
    gl.inject(
        Fault(
            status=403, method="POST", path="/trigger", body={"message": f"bad {gl.trigger_token}"}
        )
    )
    with pytest.raises(RunnerUnauthorized) as refused:
        runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-t3"})
    for text in (str(refused.value), refused.value.summary):
        assert gl.trigger_token not in text and "<redacted>" in text


def test_a_lost_create_response_is_resolved_by_name_not_by_a_second_pipeline(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner(lookup_before_trigger=False)
    gl.inject(Fault(status=502, after_handling=True, method="POST", path="/pipeline"))
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-lost"})
    [pipeline] = gl.pipelines()
    assert build_id == BuildID(f"gl:{gl.project_id}/{pipeline.id}")
    [lookup] = [r for r in gl.requests_matching("GET", "/pipelines") if r.param("name")]
    assert lookup.param("name") == "buildq req-lost" and lookup.param("ref") == "main"


def test_an_unnamed_pipeline_is_reported_at_create(make_gl_runner: MakeRunner) -> None:
    with FakeGitLab(named=False) as unnamed, structlog.testing.capture_logs() as logs:
        runner = make_gl_runner(api_url=f"{unnamed.url}/api/v4")
        runner._core.client.headers["Authorization"] = f"Bearer {unnamed.token}"
        runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-noname"})
    assert [e["expected"] for e in logs if e["event"] == "runner_pipeline_unnamed"] == [
        "buildq req-noname"
    ]


def test_rate_limit_headers_pace_and_a_429_is_waited_out(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-rl"})
    gl.rate.block(1.0)
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    assert 429 in [r.status for r in gl.requests]
    signal = rate_signal(
        httpx.Response(
            200,
            headers={"RateLimit-Remaining": "5", "RateLimit-Limit": "600", "RateLimit-Reset": "1"},
        )
    )
    # RateLimit-Reset is an epoch time on GitLab (not seconds from now like Buildkite's).
    assert (signal.remaining, signal.limit, signal.reset_in_s) == (5, 600, 0.0)
    # A wait longer than max_rate_wait_s fails at once, as transient.
    impatient = make_gl_runner(max_rate_wait_s=0.5)
    gl.rate.block(30.0)
    with pytest.raises(TransientRunnerError, match="rate limit"):
        for _ in range(3):  # the first 429 tells the runner how long to hold off
            impatient.status(build_id)


def test_5xx_and_timeouts_are_transient_and_a_refused_token_is_unauthorized(
    gl: FakeGitLab, make_gl_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_gl_runner(read_timeout_s=0.3)
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-f"})
    gl.fail_next(2, 503, method="GET")
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED  # retried within the call
    gl.fail_next(3, 500, method="GET")
    with pytest.raises(TransientRunnerError, match="500"):
        runner.status(build_id)
    gl.inject(Fault(delay_s=1.0, method="GET", count=3))
    with pytest.raises(TransientRunnerError, match="Timeout"):
        runner.status(build_id)
    monkeypatch.setenv(GL_TOKEN_ENV, "glpat-wrong-SECRET")
    wrong = make_gl_runner()
    with pytest.raises(RunnerError) as refused:
        wrong.status(build_id)
    # The token is refused: the runner is unhealthy and the build is polled again later
    # (issue 15), not failed.
    assert isinstance(refused.value, RunnerUnauthorized)
    assert "401" in str(refused.value) and "glpat-wrong-SECRET" not in str(refused.value)


def test_a_project_hidden_from_the_token_is_refused_and_a_deleted_pipeline_is_lost(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-hidden"})
    # GitLab answers 404, not 403, for a project the token cannot see (issue 15): the runner
    # is refused and the build polled on, not failed as lost.
    gl.visible = False
    with pytest.raises(RunnerUnauthorized) as refused:
        runner.status(build_id)
    assert f"project {gl.project_id}" in refused.value.summary
    gl.visible = True
    with gl.lock:
        del gl._pipelines[pipeline_id(build_id)]
    with pytest.raises(BuildNotFound):
        runner.status(build_id)


def test_cancel_stops_a_running_pipeline_and_leaves_a_finished_one(
    gl: FakeGitLab, make_gl_runner: MakeRunner
) -> None:
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-c"})
    gl.set_status(pipeline_id(build_id), "running")
    runner.cancel(build_id)
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED
    runner.cancel(build_id)
    assert gl.request_count("POST", "/cancel") == 1


def test_config_needs_a_project_and_refuses_unknown_keys(
    gl: FakeGitLab, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GL_TOKEN_ENV, gl.token)
    kind = registry.get("gitlab")
    with pytest.raises(ConfigError, match=r"runners\.gl\.project"):
        kind.validate(Table("runners.gl", {"type": "gitlab", "token": "x"}))
    with pytest.raises(ConfigError, match=r"runners\.gl\.manual_az"):
        kind.validate(gitlab_table(gl, manual_az="running"))


def test_pipeline_hooks_are_checked_by_token_and_name_the_pipeline(
    gl: FakeGitLab, make_gl_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILDQ_TEST_GL_HOOK", "hook-SECRET")
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-w"})
    config = registry.get("gitlab").validate(gitlab_hooked(gl))
    route = route_for("gl", config, "gitlab")
    assert route is not None
    seen: list[BuildID] = []
    server = WebhookServer(
        WebhookConfig(enabled=True, port=0), [route], lambda _r, b: seen.append(b)
    )
    server.start()
    try:
        url = f"{server.url}/webhooks/gl"
        assert gl.send_webhook(url, "hook-SECRET", pipeline_id(build_id)).status_code == 202
        assert gl.send_webhook(url, "wrong", pipeline_id(build_id)).status_code == 401
        job_event = httpx.post(
            url, json={"object_kind": "build"}, headers={"X-Gitlab-Token": "hook-SECRET"}
        )
        assert job_event.status_code == 200
        broken = httpx.post(
            url, json={"object_kind": "pipeline"}, headers={"X-Gitlab-Token": "hook-SECRET"}
        )
        assert broken.status_code == 400
    finally:
        server.stop()
    assert seen == [build_id]


def gitlab_hooked(gl: FakeGitLab) -> Table:
    return gitlab_table(gl, webhook_secret_env="BUILDQ_TEST_GL_HOOK")
