"""The shared rate budget: one per runner, honoured by every thread, before and after a 429."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable

import pytest

from buildq.buildrunner._ratelimit import RateBudget, RateLimitWait, RateSignal
from buildq.buildrunner.buildkite import BuildkiteRunner
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildStatus,
    Change,
    TransientRunnerError,
)
from buildq.buildrunner.github import GitHubRunner
from tests.support.fakeci import FakeBuildkite, FakeGitHub

THREADS = 20
POLLS_PER_THREAD = 3


class FakeTime:
    """A monotonic clock whose sleep just moves it: budget arithmetic without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_budget_is_free_while_plenty_is_left() -> None:
    t = FakeTime()
    budget = RateBudget(pace_below_fraction=0.5, clock=t.clock, sleep=t.sleep)
    budget.observe(RateSignal(remaining=150, limit=200, reset_in_s=30))
    for _ in range(10):
        budget.acquire(max_wait_s=1)
    assert t.sleeps == []


def test_budget_spreads_the_remainder_over_the_time_to_reset() -> None:
    t = FakeTime()
    budget = RateBudget(pace_below_fraction=0.5, clock=t.clock, sleep=t.sleep)
    budget.observe(RateSignal(remaining=4, limit=200, reset_in_s=8))
    starts = []
    for _ in range(4):
        budget.acquire(max_wait_s=60)
        starts.append(t.now)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap >= 1.9 for gap in gaps), gaps
    assert starts[-1] - starts[0] <= 8


def test_budget_holds_everyone_after_a_429_and_refuses_long_waits() -> None:
    t = FakeTime()
    budget = RateBudget(clock=t.clock, sleep=t.sleep)
    budget.observe(RateSignal(remaining=0, limit=200, reset_in_s=12, limited_for_s=12))
    with pytest.raises(RateLimitWait) as raised:
        budget.acquire(max_wait_s=5)
    # What the vendor said, plus up to a second of jitter.
    assert 12 <= raised.value.wait_s <= 13
    assert t.sleeps == []
    budget.acquire(max_wait_s=20)
    assert t.sleeps == [pytest.approx(raised.value.wait_s)]


def test_429_holds_every_polling_thread_until_the_reset(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner
) -> None:
    build_id = bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    bk.block_after(requests=15, reset_in_s=1.0)
    results: list[BuildStatus] = []
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def poll() -> None:
        start.wait()
        try:
            for _ in range(POLLS_PER_THREAD):
                results.append(bk_runner.status(build_id)[0])
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=poll) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=20)

    assert errors == []
    assert results == [BuildStatus.ACCEPTED] * THREADS * POLLS_PER_THREAD
    polls = bk.requests_matching("GET", "/builds/1")
    limited = [r for r in polls if r.status == 429]
    first_429 = min(r.at for r in limited)
    # Requests already on the wire when the first 429 was answered may be refused too (on a
    # loaded machine a thread can take a while to get its request out); after that nobody
    # sends anything until the reset the fake announced (1 s, plus the runner's jitter).
    in_flight = [r for r in limited if r.at - first_429 < 0.5]
    assert len(limited) == len(in_flight) <= THREADS
    quiet = [r for r in polls if first_429 + 0.5 <= r.at < first_429 + 0.95]
    assert quiet == []
    assert max(r.at for r in polls) >= first_429 + 0.95


def test_budget_slows_down_before_it_runs_out(
    bk: FakeBuildkite, bk_runner: BuildkiteRunner
) -> None:
    build_id = bk_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    bk.rate.set(remaining=5, reset_in_s=1.0, limit=100)
    for _ in range(8):
        assert bk_runner.status(build_id)[0] is BuildStatus.ACCEPTED
    polls = bk.requests_matching("GET", "/builds/1")
    assert [r.status for r in polls if r.status == 429] == []
    # Five requests were left for a second: they are spread out, not burnt at once
    # followed by a stall until the reset.
    gaps = [b.at - a.at for a, b in itertools.pairwise(polls)]
    assert min(gaps[1:4]) >= 0.1, gaps  # the first poll is what told the runner


def test_wait_longer_than_allowed_is_transient_without_blocking(
    bk: FakeBuildkite, make_bk_runner: Callable[..., BuildkiteRunner]
) -> None:
    runner = make_bk_runner(max_rate_wait_s=0.5)
    build_id = runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    bk.rate.block(reset_in_s=30)
    for _ in range(3):
        with pytest.raises(TransientRunnerError, match="rate limit"):
            runner.status(build_id)
    # The first refusal taught the shared budget: later calls fail without asking again.
    assert bk.request_count("GET", "/builds/1") == 1


def test_github_secondary_limit_403_with_retry_after(
    gh: FakeGitHub, gh_runner: GitHubRunner
) -> None:
    build_id = gh_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    gh.secondary_limit = True
    gh.rate.block(reset_in_s=1.0)

    assert gh_runner.status(build_id)[0] is BuildStatus.ACCEPTED

    polls = gh.requests_matching("GET", "/attempts/1")
    assert [r.status for r in polls] == [403, 200]
    assert polls[1].at - polls[0].at >= 0.9


def test_github_primary_limit_waits_for_reset(gh: FakeGitHub, gh_runner: GitHubRunner) -> None:
    build_id = gh_runner.trigger("main", [], [Change("c")], {CORRELATION_KEY: "req-1"})
    gh.rate.set(remaining=0, reset_in_s=1.0)
    assert gh_runner.status(build_id)[0] is BuildStatus.ACCEPTED
    polls = gh.requests_matching("GET", "/attempts/1")
    assert [r.status for r in polls] == [429, 200]
    assert polls[1].at - polls[0].at >= 0.9
    # Now the budget knows the window: the next poll goes straight through.
    assert gh_runner.status(build_id)[0] is BuildStatus.ACCEPTED
    assert gh.request_count("GET", "/attempts/1") == 3


def test_one_budget_per_runner_instance(
    make_bk_runner: Callable[..., BuildkiteRunner],
) -> None:
    first, second = make_bk_runner(), make_bk_runner()
    assert first.budget is not second.budget
