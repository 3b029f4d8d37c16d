"""sim: planned timing and outcomes, cancels, and answers that survive a restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from buildq.buildrunner.contract import BuildID, BuildNotFound, BuildStatus, Change
from buildq.buildrunner.sim import SimConfig, SimProfile, SimRunner, Span
from buildq.config.base import ConfigError, Table
from tests.support.runners import FakeClock
from tests.support.waiting import wait_until

T0 = 1_800_000_000.0


def _config(
    accepted: tuple[float, float] = (2.0, 2.0),
    running: tuple[float, float] = (3.0, 3.0),
    failure_probability: float = 0.0,
    **kwargs: object,
) -> SimConfig:
    profile = SimProfile(Span(*accepted), Span(*running), failure_probability)
    return SimConfig(profile, **kwargs)  # type: ignore[arg-type]


def test_build_moves_through_its_planned_states() -> None:
    clock = FakeClock(T0)
    runner = SimRunner(_config(), clock=clock)
    build_id = runner.trigger("main", [Change("a")], [Change("b")])
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    clock.advance(1.999)
    status, meta = runner.status(build_id)
    assert status is BuildStatus.ACCEPTED and "started_at" not in meta
    clock.advance(0.001)
    status, meta = runner.status(build_id)
    assert status is BuildStatus.RUNNING
    assert meta["started_at"] == "2027-01-15T08:00:02.000+00:00"
    assert meta["native_state"] == "running" and meta["duration_s"] == "0.000"
    clock.advance(3.0)
    status, meta = runner.status(build_id)
    assert status is BuildStatus.SUCCEEDED
    assert meta == {
        "url": f"sim://{build_id.id}",
        "native_state": "succeeded",
        "started_at": "2027-01-15T08:00:02.000+00:00",
        "finished_at": "2027-01-15T08:00:05.000+00:00",
        "duration_s": "3.000",
    }


def test_build_finishes_on_the_real_clock() -> None:
    runner = SimRunner(_config(accepted=(0.02, 0.02), running=(0.05, 0.05)))
    build_id = runner.trigger("main", [], [Change("b")])
    wait_until(lambda: runner.status(build_id)[0] is BuildStatus.RUNNING, timeout=5)
    wait_until(lambda: runner.status(build_id)[0] is BuildStatus.SUCCEEDED, timeout=5)


def test_ranges_are_respected() -> None:
    runner = SimRunner(_config(accepted=(1.0, 2.0), running=(0.5, 0.75), seed=3))
    plans = [runner.trigger("main", [], []).id.split("-") for _ in range(500)]
    accepted = [int(plan[2]) for plan in plans]
    running = [int(plan[3]) for plan in plans]
    assert min(accepted) >= 1000 and max(accepted) <= 2000 and len(set(accepted)) > 100
    assert min(running) >= 500 and max(running) <= 750


def _outcomes(seed: int) -> list[BuildStatus]:
    clock = FakeClock(T0)
    runner = SimRunner(_config(failure_probability=0.3, seed=seed), clock=clock)
    ids = [runner.trigger("main", [], []) for _ in range(1000)]
    clock.advance(10.0)
    return [runner.status(build_id)[0] for build_id in ids]


def test_failure_rate_follows_probability_and_seed() -> None:
    outcomes = _outcomes(seed=1234)
    failures = outcomes.count(BuildStatus.FAILED)
    assert 240 <= failures <= 360, failures
    assert failures + outcomes.count(BuildStatus.SUCCEEDED) == 1000
    assert _outcomes(seed=1234) == outcomes
    assert _outcomes(seed=4321) != outcomes


def test_failed_build_says_why() -> None:
    clock = FakeClock(T0)
    runner = SimRunner(_config(failure_probability=1.0), clock=clock)
    build_id = runner.trigger("main", [], [])
    clock.advance(5.0)
    status, meta = runner.status(build_id)
    assert status is BuildStatus.FAILED
    assert meta["failure_reason"] == "verdict" and meta["native_state"] == "failed"


def test_same_seed_never_repeats_an_id() -> None:
    first, second = SimRunner(_config(seed=1)), SimRunner(_config(seed=1))
    ids = {runner.trigger("main", [], []) for _ in range(1000) for runner in (first, second)}
    assert len(ids) == 2000


def test_queue_overrides() -> None:
    slow = SimProfile(Span(0.0, 0.0), Span(100.0, 100.0), failure_probability=1.0)
    runner = SimRunner(SimConfig(SimProfile(), queues={"slow": slow}))
    assert runner.trigger("slow", [], []).id.split("-")[2:5] == ["0", "100000", "f"]
    assert runner.trigger("other", [], []).id.split("-")[2:4] == ["1000", "5000"]


@pytest.mark.parametrize("state_dir", [None, "cancels"])
def test_cancel_accepted_and_running_builds(tmp_path: Path, state_dir: str | None) -> None:
    clock = FakeClock(T0)
    config = _config(state_dir=tmp_path / state_dir if state_dir else None)
    runner = SimRunner(config, clock=clock)
    waiting, running = runner.trigger("main", [], []), runner.trigger("main", [], [])
    runner.cancel(waiting)
    clock.advance(2.5)
    runner.cancel(running)
    runner.cancel(running)
    clock.advance(100.0)
    status, meta = runner.status(waiting)
    assert status is BuildStatus.CANCELLED and "started_at" not in meta
    assert meta["finished_at"] == "2027-01-15T08:00:00.000+00:00"
    status, meta = runner.status(running)
    assert status is BuildStatus.CANCELLED and meta["failure_reason"] == "cancelled"
    assert meta["finished_at"] == "2027-01-15T08:00:02.500+00:00"
    assert meta["duration_s"] == "0.500"


def test_restart_reports_same_state_including_cancel(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    config = _config(failure_probability=0.5, seed=9, state_dir=tmp_path / "sim")
    before = SimRunner(config, clock=clock)
    ids = [before.trigger("main", [], []) for _ in range(20)]
    clock.advance(2.5)
    before.cancel(ids[0])
    answers = [before.status(build_id) for build_id in ids]
    clock.advance(10.0)
    finished = [before.status(build_id) for build_id in ids]

    clock.advance(-10.0)
    after = SimRunner(config, clock=clock)
    assert [after.status(build_id) for build_id in ids] == answers
    clock.advance(10.0)
    assert [after.status(build_id) for build_id in ids] == finished
    assert finished[0][0] is BuildStatus.CANCELLED


def test_without_state_dir_cancels_are_forgotten_on_restart() -> None:
    clock = FakeClock(T0)
    before = SimRunner(_config(), clock=clock)
    build_id = before.trigger("main", [], [])
    before.cancel(build_id)
    assert SimRunner(_config(), clock=clock).status(build_id)[0] is BuildStatus.ACCEPTED


@pytest.mark.parametrize(
    "raw",
    ["noop-1", "sim-1-2-3-x-0123456789abcdef", "sim-1-2-3-p-0123", "sim-1-2-3-p-../../etc/pass"],
)
def test_malformed_ids_are_not_found(raw: str) -> None:
    runner = SimRunner(_config())
    with pytest.raises(BuildNotFound):
        runner.status(BuildID(raw))
    with pytest.raises(BuildNotFound):
        runner.cancel(BuildID(raw))


def test_config_from_table(tmp_path: Path) -> None:
    table = Table(
        "runners.demo",
        {
            "accepted_s": 0.5,
            "accepted_max_s": 2,
            "running_s": 10,
            "failure_probability": 0.2,
            "seed": 42,
            "state_dir": str(tmp_path),
            "queues": {"slow": {"running_s": 60.0}, "flaky": {"failure_probability": 0.9}},
        },
    )
    config = SimConfig.from_table(table)
    assert config.default == SimProfile(Span(0.5, 2.0), Span(10.0, 10.0), 0.2)
    assert config.profile("slow") == SimProfile(Span(0.5, 2.0), Span(60.0, 60.0), 0.2)
    assert config.profile("flaky").failure_probability == 0.9
    assert config.profile("unknown") == config.default
    assert (config.seed, config.state_dir) == (42, tmp_path)
    assert SimConfig.from_table(Table("runners.sim", {})) == SimConfig()


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"failure_probability": 1.5}, "runners.sim.failure_probability"),
        ({"accepted_s": -1}, "runners.sim.accepted_s"),
        ({"running_s": 5, "running_max_s": 1}, "runners.sim.running_max_s"),
        ({"seed": "x"}, "runners.sim.seed"),
        ({"acepted_s": 1}, "runners.sim.acepted_s"),
        ({"queues": {"q": {"running": 1}}}, "runners.sim.queues.q.running"),
        ({"queues": {"q": 3}}, "runners.sim.queues.q"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        SimConfig.from_table(Table("runners.sim", data))
    assert raised.value.key == key


def test_status_fault_file_makes_status_fail_transiently(tmp_path):
    from buildq.buildrunner import Change, TransientRunnerError
    from buildq.buildrunner.sim import SimConfig, SimRunner

    fault = tmp_path / "fault"
    runner = SimRunner(SimConfig(status_fault_file=fault))
    build = runner.trigger("q", [], [Change("c")])
    runner.status(build)
    fault.touch()
    with pytest.raises(TransientRunnerError, match="simulated"):
        runner.status(build)
    fault.unlink()
    assert runner.status(build)[0].value in ("ACCEPTED", "RUNNING")
