"""command: real processes, cancelled as a group, limited in number, known across restarts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildq.buildrunner import _command_supervisor as files
from buildq.buildrunner.command import CommandConfig, CommandRunner
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
)
from buildq.config.base import ConfigError, Table
from buildq.testing.conformance import HOSTILE_CHANGES
from tests.support.runners import recorded_pid, stop_command_builds
from tests.support.waiting import wait_until

# Blocks until the test creates <gates>/<build id>: the build runs exactly as long as wanted.
GATED = 'while [ ! -e "{gates}/$BUILDQ_BUILD_ID" ]; do sleep 0.01; done; echo released'


@pytest.fixture
def work_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "work"
    stop_command_builds(tmp_path / "work")


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    (tmp_path / "gates").mkdir()
    return tmp_path / "gates"


def _runner(work_dir: Path, command: str, **kwargs: object) -> CommandRunner:
    return CommandRunner(CommandConfig(command=command, work_dir=work_dir, **kwargs))  # type: ignore[arg-type]


def _finished(runner: CommandRunner, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
    def terminal() -> tuple[BuildStatus, BuildMetadata] | None:
        answer = runner.status(build_id)
        return answer if answer[0].is_terminal else None

    answer = wait_until(terminal, message=f"{build_id} to finish")
    assert answer is not None
    return answer


def _wait_status(runner: CommandRunner, build_id: BuildID, status: BuildStatus) -> None:
    wait_until(lambda: runner.status(build_id)[0] is status, message=f"{build_id} {status}")


def _build_dir(work_dir: Path, build_id: BuildID) -> Path:
    return work_dir / "builds" / build_id.id


def _running_pid(work_dir: Path, build_id: BuildID, name: str) -> int:
    pid = wait_until(lambda: recorded_pid(_build_dir(work_dir, build_id), name), message=name)
    assert pid is not None
    return pid


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _no_live_member(pgid: int) -> bool:
    """No process of the group is running; zombies are left for init, which may be slow."""
    for entry in Path("/proc").iterdir():
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return False
    return True


def _log(meta: BuildMetadata) -> str:
    assert meta["url"].startswith("file:///")
    return Path(meta["url"].removeprefix("file://")).read_text()


def test_success(work_dir: Path) -> None:
    runner = _runner(work_dir, "echo building; exit 0")
    build_id = runner.trigger("main", [], [Change("c1", "abc")])
    status, meta = _finished(runner, build_id)
    assert status is BuildStatus.SUCCEEDED
    assert meta["exit_code"] == "0" and "failure_reason" not in meta
    assert {"started_at", "finished_at", "duration_s", "native_state"} <= set(meta)
    assert _log(meta) == "building\n"


def test_failure_reports_exit_code(work_dir: Path) -> None:
    runner = _runner(work_dir, "echo broken >&2; exit 7")
    status, meta = _finished(runner, runner.trigger("main", [], [Change("c1")]))
    assert status is BuildStatus.FAILED
    assert (meta["exit_code"], meta["failure_reason"]) == ("7", "verdict")
    assert _log(meta) == "broken\n"


def test_environment_and_changes_file(work_dir: Path) -> None:
    command = 'echo "$BUILDQ_BUILD_ID|$BUILDQ_QUEUE|$BUILDQ_CHANGES_FILE"'
    runner = _runner(work_dir, command)
    metadata = {"requester": 'O\'Brien "ops" \u00e9\U0001f680', CORRELATION_KEY: "req/1"}
    build_id = runner.trigger("q\u00fceue", HOSTILE_CHANGES[:2], HOSTILE_CHANGES[2:], metadata)
    status, meta = _finished(runner, build_id)
    assert status is BuildStatus.SUCCEEDED
    logged_id, queue, changes_file = _log(meta).rstrip("\n").split("|")
    assert (logged_id, queue) == (build_id.id, "q\u00fceue")
    raw = Path(changes_file).read_bytes()
    assert "\U0001f680".encode() in raw, "unicode is written verbatim, not escaped"
    request = json.loads(raw)
    assert [Change.from_json(c) for c in request["base"]] == list(HOSTILE_CHANGES[:2])
    assert [Change.from_json(c) for c in request["head"]] == list(HOSTILE_CHANGES[2:])
    assert request["metadata"] == metadata and request["queue"] == "q\u00fceue"


def test_large_output_does_not_block(work_dir: Path) -> None:
    runner = _runner(work_dir, "head -c 20000000 /dev/zero | tr '\\0' x; echo")
    status, meta = _finished(runner, runner.trigger("main", [], []))
    assert status is BuildStatus.SUCCEEDED
    assert Path(meta["url"].removeprefix("file://")).stat().st_size == 20_000_001


def test_cancel_running_build_stops_whole_group(work_dir: Path, gates: Path) -> None:
    # Two background processes besides the shell: the whole group must go, not just the leader.
    runner = _runner(work_dir, f"sleep 30 & sleep 30 & {GATED.format(gates=gates)}")
    build_id = runner.trigger("main", [], [])
    pgid = _running_pid(work_dir, build_id, files.COMMAND_PID_FILE)
    assert runner.status(build_id)[0] is BuildStatus.RUNNING
    runner.cancel(build_id)
    wait_until(lambda: _group_gone(pgid), message="the process group to go")
    status, meta = _finished(runner, build_id)
    assert status is BuildStatus.CANCELLED and meta["failure_reason"] == "cancelled"


def test_cancel_escalates_without_blocking_the_caller(work_dir: Path) -> None:
    runner = _runner(work_dir, "trap '' TERM; sleep 30 & sleep 30", cancel_grace_s=3.0)
    build_id = runner.trigger("main", [], [])
    pgid = _running_pid(work_dir, build_id, files.COMMAND_PID_FILE)
    started = time.monotonic()
    runner.cancel(build_id)
    # Well below the grace, with room for a loaded machine.
    assert time.monotonic() - started < 2.0, "cancel waited for the grace period"
    assert runner.status(build_id)[1]["native_state"] == "cancelling"
    wait_until(lambda: _group_gone(pgid), message="SIGKILL after the grace period")
    status, meta = _finished(runner, build_id)
    assert status is BuildStatus.CANCELLED and meta["exit_code"] == str(128 + signal.SIGKILL)


def test_cancel_waiting_build_never_starts_it(work_dir: Path, gates: Path) -> None:
    runner = _runner(work_dir, GATED.format(gates=gates), max_parallel=1)
    first, second = runner.trigger("main", [], []), runner.trigger("main", [], [])
    runner.cancel(second)
    assert runner.status(second)[0] is BuildStatus.CANCELLED
    (gates / first.id).touch()
    assert _finished(runner, first)[0] is BuildStatus.SUCCEEDED
    status, meta = runner.status(second)
    assert status is BuildStatus.CANCELLED and "started_at" not in meta


def test_parallel_limit(work_dir: Path, gates: Path) -> None:
    runner = _runner(work_dir, GATED.format(gates=gates), max_parallel=1)
    first, second = runner.trigger("main", [], []), runner.trigger("main", [], [])
    _running_pid(work_dir, first, files.COMMAND_PID_FILE)
    for _ in range(5):
        status, meta = runner.status(second)
        assert (status, meta["native_state"]) == (BuildStatus.ACCEPTED, "waiting")
    assert runner.status(first)[0] is BuildStatus.RUNNING
    (gates / first.id).touch()
    assert _finished(runner, first)[0] is BuildStatus.SUCCEEDED
    _wait_status(runner, second, BuildStatus.RUNNING)
    (gates / second.id).touch()
    assert _finished(runner, second)[0] is BuildStatus.SUCCEEDED


def test_recreated_runner_knows_running_and_starts_waiting_builds(
    work_dir: Path, gates: Path
) -> None:
    before = _runner(work_dir, GATED.format(gates=gates), max_parallel=1)
    first, second = before.trigger("main", [], []), before.trigger("main", [], [])
    _running_pid(work_dir, first, files.COMMAND_PID_FILE)
    del before
    after = _runner(work_dir, GATED.format(gates=gates), max_parallel=1)
    assert after.status(first)[0] is BuildStatus.RUNNING
    assert after.status(second)[0] is BuildStatus.ACCEPTED
    (gates / first.id).touch()
    _wait_status(after, second, BuildStatus.RUNNING)
    (gates / second.id).touch()
    assert _finished(after, second)[0] is BuildStatus.SUCCEEDED
    assert after.status(first)[0] is BuildStatus.SUCCEEDED


_TRIGGER_AND_EXIT = """
import sys
from pathlib import Path
from buildq.buildrunner.command import CommandConfig, CommandRunner
runner = CommandRunner(CommandConfig(command=sys.argv[1], work_dir=Path(sys.argv[2])))
print(runner.trigger("main", [], []).id)
"""


def test_build_outlives_the_daemon_process(work_dir: Path, gates: Path) -> None:
    command = GATED.format(gates=gates) + "; exit 3"
    daemon = subprocess.run(
        [sys.executable, "-c", _TRIGGER_AND_EXIT, command, str(work_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    build_id = BuildID(daemon.stdout.strip())
    restarted = _runner(work_dir, command)
    _running_pid(work_dir, build_id, files.COMMAND_PID_FILE)
    assert restarted.status(build_id)[0] is BuildStatus.RUNNING
    (gates / build_id.id).touch()
    status, meta = _finished(restarted, build_id)
    assert (status, meta["exit_code"]) == (BuildStatus.FAILED, "3")


def test_vanished_build_is_lost(work_dir: Path, gates: Path) -> None:
    runner = _runner(work_dir, GATED.format(gates=gates))
    build_id = runner.trigger("main", [], [])
    pgid = _running_pid(work_dir, build_id, files.COMMAND_PID_FILE)
    wrapper = _running_pid(work_dir, build_id, files.WRAPPER_PID_FILE)
    os.kill(wrapper, signal.SIGKILL)
    os.killpg(pgid, signal.SIGKILL)
    status, meta = _finished(runner, build_id)
    assert (status, meta["failure_reason"]) == (BuildStatus.FAILED, "lost")
    assert not (_build_dir(work_dir, build_id) / files.EXIT_FILE).exists()


def test_build_left_behind_by_dead_supervisor_is_lost_and_stopped(
    work_dir: Path, gates: Path
) -> None:
    runner = _runner(work_dir, GATED.format(gates=gates))
    build_id = runner.trigger("main", [], [])
    pgid = _running_pid(work_dir, build_id, files.COMMAND_PID_FILE)
    os.kill(_running_pid(work_dir, build_id, files.WRAPPER_PID_FILE), signal.SIGKILL)
    assert _finished(runner, build_id)[1]["failure_reason"] == "lost"
    # Its supervisor, the orphans' reaper, is dead: they are init's to reap now.
    wait_until(lambda: _no_live_member(pgid), message="the orphaned command to be stopped")


def test_correlation_key_makes_trigger_idempotent(work_dir: Path) -> None:
    runner = _runner(work_dir, "exit 0")
    other_instance = _runner(work_dir, "exit 0")
    results: list[BuildID] = []
    barrier = threading.Barrier(8)

    def trigger(target: CommandRunner) -> None:
        barrier.wait()
        results.append(target.trigger("main", [], [], {CORRELATION_KEY: "request-1"}))

    threads = [
        threading.Thread(target=trigger, args=(runner if i % 2 else other_instance,))
        for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(results)) == 1
    assert len(list((work_dir / "builds").iterdir())) == 1
    assert runner.trigger("main", [], [], {CORRELATION_KEY: "request-2"}) != results[0]
    assert runner.trigger("main", [], []) != runner.trigger("main", [], [])
    assert _finished(runner, results[0])[0] is BuildStatus.SUCCEEDED


@pytest.mark.parametrize(
    "raw",
    ["cmd-../../etc", "cmd-1700000000000-0123456789ab", "cmd-1700000000000-0123456789AB", "."],
)
def test_unknown_or_malformed_ids_are_not_found(work_dir: Path, raw: str) -> None:
    runner = _runner(work_dir, "exit 0")
    with pytest.raises(BuildNotFound):
        runner.status(BuildID(raw))
    with pytest.raises(BuildNotFound):
        runner.cancel(BuildID(raw))


def test_config_from_table(tmp_path: Path) -> None:
    table = Table(
        "runners.local",
        {"command": "make test", "work_dir": str(tmp_path), "max_parallel": 3, "cancel_grace_s": 2},
    )
    assert CommandConfig.from_table(table) == CommandConfig("make test", tmp_path, 3, 2.0)
    minimal = CommandConfig.from_table(Table("r", {"command": "x", "work_dir": "rel/dir"}))
    assert minimal.work_dir == Path.cwd() / "rel/dir"


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"work_dir": "/tmp/x"}, "runners.local.command"),
        ({"command": "x"}, "runners.local.work_dir"),
        ({"command": "x", "work_dir": "/tmp/x", "max_parallel": 0}, "runners.local.max_parallel"),
        (
            {"command": "x", "work_dir": "/tmp/x", "cancel_grace_s": -1},
            "runners.local.cancel_grace_s",
        ),
        ({"command": "x", "work_dir": "/tmp/x", "shell": "bash"}, "runners.local.shell"),
        ({"command": "x", "work_dir": "/etc/passwd"}, "runners.local.work_dir"),
    ],
)
def test_config_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        CommandConfig.from_table(Table("runners.local", data))
    assert raised.value.key == key
