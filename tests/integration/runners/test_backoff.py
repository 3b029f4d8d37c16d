"""Back-off as documented (issue 15, item 8): creates are spaced like reads, exponentially and
with jitter; a "rate limited" answer that says "come back now" still waits a little."""

from __future__ import annotations

import time

import httpx
import pytest

from buildq.buildrunner import buildkite
from buildq.buildrunner._ratelimit import HOLD_JITTER_S, MIN_HOLD_S, RateBudget
from buildq.buildrunner.buildkite import BuildkiteConfig, BuildkiteRunner
from buildq.buildrunner.contract import CORRELATION_KEY, BuildStatus, Change
from tests.integration.runners.conftest import BK_TOKEN_ENV, buildkite_table
from tests.integration.runners.test_ratelimit import FakeTime
from tests.support.fakeci import FakeBuildkite, Fault

BACKOFF_S = 1.0


def _runner(
    bk: FakeBuildkite, sleep: FakeTime | None = None, **overrides: object
) -> BuildkiteRunner:
    config = BuildkiteConfig.from_table(buildkite_table(bk, **overrides))
    return BuildkiteRunner(
        config,
        buildkite.make_client(config),
        name="ci",
        sleep=sleep.sleep if sleep else time.sleep,
    )


def test_create_attempts_back_off_exponentially_with_jitter(
    bk: FakeBuildkite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BK_TOKEN_ENV, bk.token)
    waits = FakeTime()  # records the waits instead of sleeping them
    runner = _runner(
        bk,
        waits,
        retry_attempts=4,
        retry_backoff_s=BACKOFF_S,
        retry_max_backoff_s=100.0,
        lookup_attempts=1,
        lookup_before_trigger=False,
    )
    # Three creates answered 502 (nothing created, nothing found by the token), then one works.
    bk.inject(Fault(status=502, method="POST", path="/builds", count=3))
    try:
        runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    finally:
        runner.close()
    assert len(bk.builds()) == 1
    assert len(waits.sleeps) == 3
    for n, wait in enumerate(waits.sleeps):
        base = BACKOFF_S * 2**n  # 1, 2, 4: doubling, not 1, 2, 3
        assert base <= wait <= base + BACKOFF_S, waits.sleeps
    assert waits.sleeps != [BACKOFF_S * n for n in (1, 2, 3)]  # jittered


def test_a_429_that_says_reset_now_still_waits_a_little(
    bk: FakeBuildkite, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(BK_TOKEN_ENV, bk.token)
    runner = _runner(bk)
    try:
        build_id = runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
        bk.inject(Fault(status=429, method="GET", headers={"RateLimit-Reset": "0"}))
        assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    finally:
        runner.close()
    limited, answered = bk.requests_matching("GET", "/builds/1")
    assert limited.status == 429 and answered.status == 200
    assert answered.at - limited.at >= MIN_HOLD_S


def test_holds_after_a_429_are_jittered() -> None:
    holds = set()
    for _ in range(5):
        t = FakeTime()
        budget = RateBudget(clock=t.clock, sleep=t.sleep)
        budget.observe(buildkite.rate_signal(httpx.Response(429, headers={"RateLimit-Reset": "0"})))
        budget.acquire(max_wait_s=10)
        [hold] = t.sleeps
        assert MIN_HOLD_S <= hold <= MIN_HOLD_S + HOLD_JITTER_S
        holds.add(hold)
    assert len(holds) > 1
