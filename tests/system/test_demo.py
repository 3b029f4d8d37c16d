"""``make local-start``: the demo runs its builds to the expected ends and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildq.demo import DEMO_BUILDS
from buildq.orchestrator.model import Build
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.contract import StorageError
from buildq.storage.database import Database, create_engine
from tests.support import REPO
from tests.support.waiting import wait_until

DEMO_DEADLINE_S = 90  # the demo takes ~20 s; the rest is room for a slow CI machine

pytestmark = pytest.mark.slow


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "buildq.toml"
    path.parent.mkdir()
    shutil.copy(REPO / "config" / "buildq.toml", path)
    return path


@pytest.fixture
def configured_port_taken() -> Iterator[None]:
    """Hold the config's ops port, as a running daemon would: the demo must pick another."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", 9464))
            sock.listen()
        except OSError:
            pass  # taken already, which is the case under test anyway
        yield


def _demo(config_file: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "buildq.demo", "--config", str(config_file), *extra],
        cwd=config_file.parent.parent,
        env={k: v for k, v in os.environ.items() if not k.startswith("BUILDQ_")},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(demo: subprocess.Popen[str]) -> tuple[int, str, str]:
    try:
        out, err = demo.communicate(timeout=DEMO_DEADLINE_S)
    except subprocess.TimeoutExpired:
        demo.kill()
        out, err = demo.communicate()
        raise AssertionError(
            f"demo still running after {DEMO_DEADLINE_S}s:\n{out}\n{err}"
        ) from None
    return demo.returncode, out, err


def _demo_builds(root: Path) -> list[Build]:
    db = Database(create_engine(f"sqlite:///{root / 'var' / 'buildq.db'}", pool_size=1))
    try:
        return [
            b for b in SqlBuildStore(db).list_builds(limit=1000) if b.request_id.startswith("demo-")
        ]
    finally:
        db.dispose()


def _some_build_running(root: Path) -> bool:
    if not (root / "var" / "buildq.db").exists():
        return False
    try:
        return any(b.status == "RUNNING" for b in _demo_builds(root))
    except StorageError:  # the demo has not created the tables yet
        return False


def _processes_using(config_file: Path) -> list[str]:
    """Command lines of live processes that name this config (the daemon would)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone, or not a process directory
        if str(config_file) in cmdline and proc.name != str(os.getpid()):
            found.append(f"{proc.name}: {cmdline}")
    return found


@pytest.mark.usefixtures("configured_port_taken")
def test_demo_runs_every_build_to_its_expected_end(config_file: Path) -> None:
    code, out, err = _finish(_demo(config_file, "--exit-when-done"))

    assert code == 0, out + err
    assert "Traceback" not in err, err
    assert "daemon stopped cleanly" in out
    builds = _demo_builds(config_file.parent.parent)
    assert len(builds) == len(DEMO_BUILDS)
    assert all(b.is_terminal for b in builds), [(b.request_id, b.status) for b in builds]
    ends = Counter((b.status, b.failure_reason) for b in builds)
    assert ends[("SUCCEEDED", None)] >= 1, ends
    assert ends[("FAILED", "verdict")] >= 1, ends
    assert ends[("CANCELLED", "cancelled")] == 1, ends
    assert ends[("FAILED", "timeout")] == 1, ends
    assert _processes_using(config_file) == []


def test_ctrl_c_stops_the_daemon_cleanly(config_file: Path) -> None:
    demo = _demo(config_file)
    try:
        wait_until(
            lambda: _some_build_running(config_file.parent.parent),
            timeout=60,
            interval=0.2,
            message="a demo build running",
        )
    except AssertionError:
        demo.kill()
        raise
    demo.send_signal(signal.SIGINT)
    code, out, err = _finish(demo)

    assert code == 0, out + err
    assert "Traceback" not in err, err
    assert "daemon stopped cleanly" in out
    assert _processes_using(config_file) == []
