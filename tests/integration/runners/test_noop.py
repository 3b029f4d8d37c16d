"""noop: ids never repeat, across threads, instances, restarts and replicas."""

from __future__ import annotations

import re
import subprocess
import sys
import threading

import pytest

from buildq.buildrunner.contract import BuildID, BuildNotFound, BuildStatus
from buildq.buildrunner.noop import NoopConfig, NoopRunner
from buildq.config.base import ConfigError, Table

_ID = re.compile(r"noop-[0-9]+")

# Prints this many noop ids from a fresh interpreter: a restarted daemon, or another replica.
_CHILD = """
import sys
from buildq.buildrunner.noop import NoopRunner
runner = NoopRunner()
print("\\n".join(runner.trigger("q", [], []).id for _ in range(int(sys.argv[1]))))
"""


def _number(build_id: BuildID) -> int:
    assert _ID.fullmatch(build_id.id), build_id
    return int(build_id.id.removeprefix("noop-"))


def _ids_from_subprocess(count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(count)], stdout=subprocess.PIPE, text=True
    )


def test_ids_unique_across_16_threads() -> None:
    runner = NoopRunner()
    per_thread: list[list[BuildID]] = [[] for _ in range(16)]
    barrier = threading.Barrier(16)

    def work(out: list[BuildID]) -> None:
        barrier.wait()
        out.extend(runner.trigger("q", [], []) for _ in range(1000))

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    all_ids = [build_id for ids in per_thread for build_id in ids]
    assert len(set(all_ids)) == 16_000
    for ids in per_thread:
        numbers = [_number(build_id) for build_id in ids]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers)


def test_ids_unique_and_increasing_across_two_instances() -> None:
    first, second = NoopRunner(), NoopRunner()
    ids = [runner.trigger("q", [], []) for _ in range(2000) for runner in (first, second)]
    numbers = [_number(build_id) for build_id in ids]
    assert len(set(numbers)) == len(numbers)
    assert numbers == sorted(numbers), "one sequence per process, whichever instance asks"


def test_ids_unique_after_restart_and_across_replicas() -> None:
    before = {NoopRunner().trigger("q", [], []) for _ in range(1000)}
    restarted = {NoopRunner().trigger("q", [], []) for _ in range(1000)}
    # Two processes running at once stand in for replicas on other hosts, and for restarts.
    replicas = [_ids_from_subprocess(5000) for _ in range(2)]
    outputs = [replica.communicate(timeout=30)[0].split() for replica in replicas]
    assert all(replica.returncode == 0 for replica in replicas)
    from_children = [BuildID(raw) for output in outputs for raw in output]
    for build_id in from_children:
        _number(build_id)
    everything = [*before, *restarted, *from_children]
    assert len(everything) == 12_000
    assert len(set(everything)) == len(everything)


def test_status_is_succeeded_without_metadata() -> None:
    runner = NoopRunner()
    build_id = runner.trigger("q", [], [], {"requester": "me"})
    assert runner.status(build_id) == (BuildStatus.SUCCEEDED, {})
    runner.cancel(build_id)
    assert runner.status(build_id) == (BuildStatus.SUCCEEDED, {})


@pytest.mark.parametrize("raw", ["sim-1", "noop-", "noop-12a", "noop-\u0661\u0662", "xnoop-1"])
def test_status_of_foreign_id_is_not_found(raw: str) -> None:
    with pytest.raises(BuildNotFound):
        NoopRunner().status(BuildID(raw))


def test_config_has_no_keys() -> None:
    assert NoopConfig.from_table(Table("runners.fast", {})) == NoopConfig()
    with pytest.raises(ConfigError, match=r"runners\.fast\.delay_s"):
        NoopConfig.from_table(Table("runners.fast", {"delay_s": 1}))
