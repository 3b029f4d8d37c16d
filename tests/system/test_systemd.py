"""systemd: the shipped unit verifies clean, and the daemon speaks sd_notify on a real socket."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildq.systemd import Notifier
from tests.support import REPO
from tests.support.daemon import BUILDQ
from tests.support.systemd import local_copy, receive, security, unit_settings, verify
from tests.support.waiting import wait_until

UNIT = REPO / "buildq" / "host" / "buildq.service"

CONFIG = """
[database]
url = "sqlite:///{db}"

[daemon]
shutdown_grace_s = 5
log_format = "json"

[http]
port = 0

[runners.sim]
type = "sim"

[queues.main]
runner = "sim"
"""


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    return local_copy(UNIT, tmp_path)


def test_unit_verifies_without_errors_or_warnings(local_unit: Path) -> None:
    # systemd 252 does not look up User= here, so the buildq user need not exist. verify exits
    # 0 on unknown keys and bad values (it only prints them), so the output must be empty.
    result = verify(local_unit)
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_unit_hardening_stays_high(local_unit: Path) -> None:
    # The exposure of the shipped unit is 1.5 ("OK"); 2.0 leaves room, not a loophole.
    result = security(local_unit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def test_unit_keeps_what_the_daemon_relies_on() -> None:
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"]
    assert settings["RestartPreventExitStatus"] == ["2"]  # see test_bad_start_exits_2
    # The command runner's builds must outlive a restart: see docs/runners.md.
    assert settings["KillMode"] == ["process"]
    stop_s = int(settings["TimeoutStopSec"][0].removesuffix("s"))
    assert stop_s > 30 + 10, "TimeoutStopSec must exceed the default daemon.shutdown_grace_s"


# --- sd_notify on a real socket ---------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config" / "buildq.toml"
    path.parent.mkdir()
    path.write_text(CONFIG.format(db=tmp_path / "state" / "buildq.db"))
    return path


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    yield sock
    sock.close()


def _upgrade(config_file: Path) -> None:
    subprocess.run(
        [str(BUILDQ), "db", "upgrade", "--config", str(config_file)],
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.mark.slow
def test_daemon_notifies_ready_watchdog_and_stopping(
    tmp_path: Path, config_file: Path, notify_socket: socket.socket
) -> None:
    _upgrade(config_file)
    env = {
        **os.environ,
        "NOTIFY_SOCKET": notify_socket.getsockname(),
        "WATCHDOG_USEC": "2000000",
    }
    env.pop("WATCHDOG_PID", None)
    with (tmp_path / "daemon.log").open("wb") as log:
        daemon = subprocess.Popen(
            [str(BUILDQ), "run", "--config", str(config_file)], env=env, stderr=log
        )
    try:
        receive(notify_socket, "READY=1", time.monotonic() + 30)
        # WATCHDOG_USEC=2 s asks for a ping every second.
        # Deadlines, not expectations: a loaded 2-core machine can stall the daemon for
        # seconds (seen: no datagram at all for 5 s after SIGTERM).
        receive(notify_socket, "WATCHDOG=1", time.monotonic() + 20)
        daemon.send_signal(signal.SIGTERM)
        receive(notify_socket, "STOPPING=1", time.monotonic() + 20)
        assert daemon.wait(timeout=20) == 0, (tmp_path / "daemon.log").read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()


@pytest.mark.parametrize(
    "broken",
    [
        "missing",
        "unmigrated",
        "bad_config",
        "port_in_use",
        "secret_file_mode",
        "bad_database_url",
    ],
)
def test_bad_start_is_one_line_and_exits_2(tmp_path: Path, config_file: Path, broken: str) -> None:
    """Exit status 2 is what the unit's RestartPreventExitStatus=2 keeps from crash-looping;
    the one line on stderr says what is wrong and how to fix it (no traceback)."""
    if broken == "unmigrated":
        (tmp_path / "state").mkdir()
        sqlite3.connect(tmp_path / "state" / "buildq.db").close()  # empty, never migrated
    elif broken != "missing":
        _upgrade(config_file)
    text = config_file.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        if broken == "bad_config":
            text = text.replace("port = 0", "port = -1")
        elif broken == "port_in_use":
            text = text.replace("port = 0", f"port = {taken.getsockname()[1]}")
        elif broken == "secret_file_mode":
            secret = tmp_path / "token"
            secret.write_text("s3cret-token-value")
            secret.chmod(0o644)
            text += f'\n[runners.bk]\ntype = "buildkite"\norganization = "o"\npipeline = "p"\ntoken_file = "{secret}"\n'
        elif broken == "bad_database_url":
            text = text.replace('url = "sqlite:///', 'url = "mysql+pymysql://buildq@db:port/x" #')
        config_file.write_text(text)
        result = subprocess.run(
            [str(BUILDQ), "run", "--config", str(config_file)],
            capture_output=True,
            text=True,
            timeout=60,
            env={k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"},
        )
    assert result.returncode == 2, result.stderr[-3000:]
    expected = {
        "missing": f"does not exist: run 'buildq db upgrade --config {config_file}'",
        "unmigrated": f"run 'buildq db upgrade --config {config_file}'",
        "bad_config": "http.port = -1",
        "port_in_use": "in use by another process",
        "secret_file_mode": "chmod 600",
        "bad_database_url": "database.url",
    }[broken]
    # Log events of what did start (JSON) may come first; the error is one plain line.
    lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith("buildq: "), result.stderr[-3000:]
    assert result.stderr.rstrip().endswith(lines[0]) and expected in lines[0]
    assert "s3cret" not in result.stderr
    if broken == "missing":  # a daemon never creates its database
        assert not (tmp_path / "state").exists()


# --- Notifier, in process -----------------------------------------------------------------------


def test_notifier_is_a_noop_without_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    assert not notifier.ready()


def test_notifier_pings_at_half_the_timeout_for_its_own_pid_only() -> None:
    assert Notifier({"WATCHDOG_USEC": "3000000"}).watchdog_interval_s == 1.5
    mine = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval_s == 1.5
    other = {"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(other).watchdog_interval_s is None


def test_notifier_reaches_an_abstract_socket() -> None:
    name = f"buildq-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_notifier_survives_a_vanished_socket(tmp_path: Path) -> None:
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).ready()


# --- journald priorities --------------------------------------------------------------------


def _journal_env(stream: Path) -> dict[str, str]:
    """What systemd sets when the daemon's stderr is its journal stream: the stream's
    device and inode (systemd.exec(5), $JOURNAL_STREAM)."""
    stat = stream.stat()
    env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    return {**env, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}


def _lines(path: Path) -> list[str]:
    """Complete lines only: the daemon may be mid-line when the test reads."""
    return path.read_text(errors="replace").split("\n")[:-1]


@pytest.mark.slow
def test_each_line_carries_its_priority_for_journald(tmp_path: Path, config_file: Path) -> None:
    # An unreachable database: the daemon logs `database_unavailable` (a warning) and waits.
    text = config_file.read_text()
    config_file.write_text(
        text.replace('url = "sqlite:///', 'url = "mysql+pymysql://u@127.0.0.1:1/x" #')
    )
    log = tmp_path / "journal.log"
    log.touch()
    with log.open("ab") as stream:
        daemon = subprocess.Popen(
            [str(BUILDQ), "run", "--config", str(config_file)],
            stderr=stream,
            env=_journal_env(log),
        )
    try:
        wait_until(
            lambda: any('"database_unavailable"' in line for line in _lines(log)),
            timeout=30,
            message="a database_unavailable warning",
        )
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    by_event = {}
    for line in _lines(log):
        priority, _, rest = line.partition(">")
        by_event[json.loads(rest)["event"]] = priority + ">"
    assert by_event["database_unavailable"] == "<4>"  # warning
    assert by_event["ops_http_listening"] == "<6>"  # info


def test_a_start_up_error_is_priority_err_in_the_journal(tmp_path: Path, config_file: Path) -> None:
    config_file.write_text(config_file.read_text().replace("port = 0", "port = -1"))
    log = tmp_path / "journal.log"
    log.touch()
    with log.open("ab") as stream:
        result = subprocess.run(
            [str(BUILDQ), "run", "--config", str(config_file)],
            stderr=stream,
            env=_journal_env(log),
            timeout=60,
        )
    assert result.returncode == 2
    assert _lines(log) == ["<3>buildq: config http.port = -1: expected a value >= 0"]


def test_no_priority_prefix_when_stderr_is_not_the_journal(
    tmp_path: Path, config_file: Path
) -> None:
    """A JOURNAL_STREAM inherited by a process whose stderr goes elsewhere (a redirect in a
    unit's shell script, a child of the daemon) must not prefix that file's lines."""
    config_file.write_text(config_file.read_text().replace("port = 0", "port = -1"))
    other = tmp_path / "other"
    other.touch()
    result = subprocess.run(
        [str(BUILDQ), "run", "--config", str(config_file)],
        capture_output=True,
        text=True,
        env=_journal_env(other),
        timeout=60,
    )
    assert result.stderr.startswith("buildq: config http.port = -1")
