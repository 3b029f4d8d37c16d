"""Faults of the host under the daemon (issue 14): a full disk, and a step of the wall clock.

- A full disk is a storage fault an operator can fix: every write is retried with back-off
  (/readyz says why, ``buildq_database_writable`` is 0), nothing is dead-lettered or turned
  into a result, and the builds finish once there is space again. SQLite on a small
  tmpfs this test mounts (it runs as root here, as CI does).
- A wall-clock step on the daemon's host (NTP, a VM resumed) changes no deadline: the daemon
  reads the database's clock and advances it by the monotonic clock. The step is injected by
  the shim in tests/support/shims, which moves ``time.time`` inside the daemon process only, so on
  MariaDB the database's clock does not move; on SQLite the database clock is the host's own
  (docs/scaling.md).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from buildq.migrations import upgrade
from tests.support import shims
from tests.support.daemon import DaemonProcess, World, write_config
from tests.support.scrape import get, ops_port, scrape
from tests.support.waiting import wait_until

SCRIPTED = """
[runners.sim]
type = "sim"
accepted_s = 0.0
running_s = 0.0
failure_probability = 0.0
polls = {polls}

[poll]
accepted_interval_s = 0.1
running_interval_s = 0.1
growth = 1.0
jitter = 0.0
finish_by_s = {finish_by_s}

[queues.main]
runner = "sim"
"""


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs of the test's own."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(directory: Path) -> Path:
    """Write files until the disk is full to the last block; the directory holding them, to
    delete to give the space back."""
    filler = directory / "filler"
    filler.mkdir()
    for n, size in enumerate((1 << 20, 1 << 12, 1)):
        with (filler / str(n)).open("wb", buffering=0) as out, contextlib.suppress(OSError):
            while True:
                out.write(b"\0" * size)
    return filler


def test_a_full_disk_is_retried_and_the_builds_finish_when_space_returns(
    small_disk: Path, tmp_path: Path
) -> None:
    url = f"sqlite:///{small_disk / 'buildq.db'}"
    upgrade(url)
    world = World(url)
    config = write_config(tmp_path / "config", url, SCRIPTED.format(polls=100, finish_by_s=0))
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()
        port = ops_port(daemon)
        requests = world.submit("main", 40)
        wait_until(
            lambda: (world.rows("SELECT MIN(polls) AS n FROM builds")[0].n or 0) >= 2,
            timeout=60,
            message="builds polled",
        )
        filler = fill(small_disk)
        wait_until(
            lambda: "disk is full" in get(port, "/readyz").text,
            timeout=60,
            message="/readyz says the database refuses writes",
        )
        assert get(port, "/healthz").status_code == 200
        wait_until(lambda: scrape(port).value("buildq_database_writable") == 0, timeout=30)
        shutil.rmtree(filler)
        wait_until(lambda: world.all_terminal(len(requests)), timeout=120, message="finished")
        assert {(b.status, b.polls) for b in world.builds()} == {("SUCCEEDED", 100)}
        assert world.results_per_request() == {r: 1 for r in requests}
        for dlq in ("build_dlq", "buildsignal_dlq"):
            assert world.dead_letters(dlq) == []
        events = {e["event"] for e in daemon.events()}
        assert "lease_renewal_failed" in events and "lease_renewal_recovered" in events
        assert not events & {"delivery_rejected", "handler_failed", "build_failed_infra"}
        wait_until(lambda: get(port, "/readyz").status_code == 200, message="ready again")
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
        world.close()


def test_a_wall_clock_step_on_the_daemons_host_times_nothing_out(
    backend_url: str, tmp_path: Path
) -> None:
    if sa.make_url(backend_url).get_backend_name() == "sqlite":
        pytest.skip("SQLite's clock is the host's own: a step moves the database's too")
    step = tmp_path / "step"
    step.write_text("0")
    world = World(backend_url)
    # Builds live for 60 polls at 0.1 s and must finish within 300 s: a +2 h step of the
    # clock deadlines were read from would time every one of them out.
    config = write_config(
        tmp_path / "config", backend_url, SCRIPTED.format(polls=60, finish_by_s=300)
    )
    # The sim runner's clock is stepped too; its answers are scripted by poll count, so the
    # step does not change them.
    daemon = DaemonProcess(config, tmp_path, shims.env(clock_step_file=step))
    try:
        daemon.start()
        requests = world.submit("main", 10)
        wait_until(
            lambda: (world.rows("SELECT MIN(polls) AS n FROM builds")[0].n or 0) >= 3,
            timeout=60,
            message="builds polled",
        )
        step.write_text(str(2 * 3600))  # NTP steps the host's clock two hours ahead
        wait_until(lambda: world.all_terminal(len(requests)), timeout=180, message="finished")
        assert {(b.status, b.failure_reason) for b in world.builds()} == {("SUCCEEDED", None)}
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
        world.close()
