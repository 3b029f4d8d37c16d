"""The Jenkins runner against a fake Jenkins on 127.0.0.1: queue items, results, faults."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import pytest

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
from buildq.buildrunner.jenkins import JenkinsRunner, token_of
from tests.integration.runners.conftest import JK_TOKEN_ENV, queue_id
from tests.support.fakeci import Fault
from tests.support.fakeci.jenkins import CRUMB_FIELD, FakeJenkins

MakeRunner = Callable[..., JenkinsRunner]
HEAD = [Change("change-1", "abc123")]


def test_a_build_goes_from_queue_item_to_build_number_and_survives_being_forgotten(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [Change("b", "r0")], HEAD, {CORRELATION_KEY: "req-1"})
    [item] = jk.items()
    assert build_id == BuildID(f"jk:folder/app-merge/{item.id}/{token_of('req-1')}")
    assert item.parameters["BUILDQ_REQUEST_ID"] == "req-1"
    assert item.parameters["BUILDQ_BASE"] == '[{"id":"b","revision":"r0","extra":{}}]'
    status, meta = runner.status(build_id)
    assert (status, meta["native_state"]) == (BuildStatus.ACCEPTED, "queued")
    number = jk.start_build(item.id)
    status, meta = runner.status(build_id)
    assert (status, meta["number"], meta[CORRELATION_KEY]) == (
        BuildStatus.RUNNING,
        str(number),
        "req-1",
    )
    # Jenkins forgets the queue item; a fresh runner (a restarted daemon) still finds the build.
    jk.forget(item.id)
    jk.finish(number, "SUCCESS")
    status, meta = make_jk_runner().status(build_id)
    assert (status, meta["native_state"]) == (BuildStatus.SUCCEEDED, "SUCCESS")
    assert meta["url"].endswith(f"/job/folder/job/app-merge/{number}/") and "duration_s" in meta
    # A retried trigger with the same request id returns that build, not a second one.
    assert make_jk_runner().trigger("main", [], HEAD, {CORRELATION_KEY: "req-1"}) == build_id
    assert len(jk.items()) == 1


@pytest.mark.parametrize(
    ("result", "expected", "reason"),
    [
        ("SUCCESS", BuildStatus.SUCCEEDED, None),
        ("UNSTABLE", BuildStatus.FAILED, "verdict"),
        ("FAILURE", BuildStatus.FAILED, "verdict"),
        ("NOT_BUILT", BuildStatus.FAILED, "infra"),
        ("ABORTED", BuildStatus.CANCELLED, None),
    ],
)
def test_every_result_is_mapped(
    jk: FakeJenkins,
    make_jk_runner: MakeRunner,
    result: str,
    expected: BuildStatus,
    reason: str | None,
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: f"req-{result}"})
    jk.finish(jk.start_build(queue_id(build_id)), result)
    status, meta = runner.status(build_id)
    assert (status, meta.get("failure_reason"), meta["native_state"]) == (expected, reason, result)


def test_unstable_can_count_as_success(jk: FakeJenkins, make_jk_runner: MakeRunner) -> None:
    runner = make_jk_runner(unstable_as="succeeded")
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-u"})
    jk.finish(jk.start_build(queue_id(build_id)), "UNSTABLE")
    assert runner.status(build_id)[0] is BuildStatus.SUCCEEDED


def test_equal_changes_on_two_requests_are_two_builds(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    # Jenkins merges queued requests with identical parameters; the request id keeps them apart.
    runner = make_jk_runner()
    first = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-a"})
    second = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-b"})
    assert first != second and len(jk.items()) == 2


def test_a_crumb_is_fetched_when_the_server_asks_for_one(make_jk_runner: MakeRunner) -> None:
    with FakeJenkins(require_crumb=True) as strict:
        runner = make_jk_runner(api_url=strict.url)
        build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-crumb"})
        runner.cancel(build_id)
        runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-crumb-2"})
        assert strict.request_count("GET", "/crumbIssuer") == 1
        posts = strict.requests_matching("POST")
        assert [r.status for r in posts] == [403, 201, 204, 201]
        assert posts[-1].headers[CRUMB_FIELD.lower()]
        assert runner.status(build_id)[0] is BuildStatus.CANCELLED


def test_a_lost_create_response_is_found_in_the_queue(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    runner = make_jk_runner(lookup_before_trigger=False)
    jk.inject(Fault(status=502, after_handling=True, method="POST", path="/buildWithParameters"))
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-lost"})
    [item] = jk.items()
    assert queue_id(build_id) == item.id
    # Lost again once the build started and the item is forgotten: found among the builds.
    jk.start_build(item.id)
    jk.forget(item.id)
    jk.inject(Fault(status=504, after_handling=True, method="POST", path="/buildWithParameters"))
    assert make_jk_runner().trigger("main", [], HEAD, {CORRELATION_KEY: "req-lost"}) == build_id


def test_cancel_takes_a_queued_item_out_and_stops_a_running_build(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    runner = make_jk_runner()
    queued = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-q"})
    runner.cancel(queued)
    assert runner.status(queued)[0] is BuildStatus.CANCELLED
    running = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-r"})
    jk.start_build(queue_id(running))
    runner.cancel(running)
    assert runner.status(running)[0] is BuildStatus.CANCELLED
    runner.cancel(running)
    assert jk.request_count("POST", "/stop") == 1 and jk.request_count("POST", "/cancelItem") == 1


def test_an_item_that_starts_before_its_cancel_arrives_is_stopped_as_a_build(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-race"})
    item = f"/queue/item/{queue_id(build_id)}/api/json"
    waiting = httpx.get(jk.url + item, auth=(jk.user, jk.token)).json()
    number = jk.start_build(queue_id(build_id))
    # The runner reads the item while it still waits; it starts before the cancel arrives.
    jk.inject(Fault(status=200, body=waiting, method="GET", path=item))
    runner.cancel(build_id)
    # Jenkins refuses to cancel an item that left the queue (500 "Could not cancel run"):
    # the runner reads again and stops the build the item became.
    assert {r.status for r in jk.requests_matching("POST", "/cancelItem")} == {500}
    assert jk.request_count("POST", f"/{number}/stop") == 1
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED
    # An item that is still waiting when Jenkins answers 500 is a failure, asked again later.
    waiting_id = queue_id(runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-500"}))
    jk.fail_next(10, 500, method="POST", path="/cancelItem")
    with pytest.raises(TransientRunnerError, match="500"):
        runner.cancel(BuildID(f"jk:{jk.job}/{waiting_id}/{token_of('req-500')}"))
    jk.clear_faults()


def test_a_job_the_user_may_not_read_is_refused_and_a_deleted_build_is_lost(
    jk: FakeJenkins, make_jk_runner: MakeRunner
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-hidden"})
    number = jk.start_build(queue_id(build_id))
    assert runner.status(build_id)[0] is BuildStatus.RUNNING
    # Without Job/Read, Jenkins answers 404 for the job and its builds: refused, not lost.
    jk.job_readable = False
    with pytest.raises(RunnerUnauthorized) as refused:
        runner.status(build_id)
    assert f"job {jk.job}" in refused.value.summary
    jk.job_readable = True
    with jk.lock:
        del jk._builds[number]
    with pytest.raises(BuildNotFound):
        runner.status(build_id)


def test_faults_proxy_limits_5xx_timeouts_and_bad_credentials(
    jk: FakeJenkins, make_jk_runner: MakeRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = make_jk_runner(read_timeout_s=0.3)
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-f"})
    jk.rate.block(1.0)  # a proxy answering 429 + Retry-After: waited out, not failed
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    assert 429 in [r.status for r in jk.requests]
    jk.fail_next(3, 502, method="GET")
    with pytest.raises(TransientRunnerError, match="502"):
        runner.status(build_id)
    jk.inject(Fault(delay_s=1.0, method="GET", count=3))
    with pytest.raises(TransientRunnerError, match="Timeout"):
        runner.status(build_id)
    monkeypatch.setenv(JK_TOKEN_ENV, "11wrongSECRETtoken")
    with pytest.raises(RunnerError) as refused:
        make_jk_runner().status(build_id)
    # The token is refused: the runner is unhealthy and the build is polled again later
    # (issue 15), not failed.
    assert isinstance(refused.value, RunnerUnauthorized)
    assert "401" in str(refused.value) and "11wrongSECRETtoken" not in str(refused.value)
