"""``buildq web`` as a service: the shipped unit verifies, the process speaks sd_notify, and a
bad ``[web]`` table stops it with one line (exit 2, which the unit does not restart)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from buildq.migrations import upgrade
from tests.support import REPO
from tests.support.cli import run_cli
from tests.support.daemon import BUILDQ
from tests.support.systemd import local_copy, receive, security, unit_settings, verify

UNIT = REPO / "buildq" / "host" / "buildq-web.service"


@pytest.fixture
def local_unit(tmp_path: Path) -> Path:
    return local_copy(UNIT, tmp_path)


def test_web_unit_verifies_without_errors_or_warnings(local_unit: Path) -> None:
    result = verify(local_unit)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stderr


def test_web_unit_is_hardened(local_unit: Path) -> None:
    result = security(local_unit)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    settings = unit_settings(UNIT.read_text())
    assert settings["Type"] == ["notify"] and settings["RestartPreventExitStatus"] == ["2"]


def test_web_notifies_ready_and_stopping(tmp_path: Path) -> None:
    config = tmp_path / "config" / "buildq.toml"
    config.parent.mkdir()
    upgrade(f"sqlite:///{tmp_path / 'buildq.db'}")  # reads never create the database
    config.write_text(
        f'[database]\nurl = "sqlite:///{tmp_path / "buildq.db"}"\n\n[web]\nport = 0\n'
        '\n[daemon]\nlog_format = "json"\n'
    )
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify.sock"))
        env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        process = subprocess.Popen(
            [str(BUILDQ), "web", "--config", str(config)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            receive(notify, "READY=1", time.monotonic() + 30)
            process.send_signal(signal.SIGTERM)
            receive(notify, "STOPPING=1", time.monotonic() + 30)
            # uvicorn re-raises the SIGTERM it drained on: a clean stop for systemd.
            assert process.wait(timeout=30) in (0, -signal.SIGTERM)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ("[web]\nprot = 1\n", "web.prot"),
        ('[web]\ntoken = "short"\n', "web.token"),
        ('[web]\ntoken_env = "BUILDQ_TEST_UNSET_TOKEN"\n', "web.token_env"),
    ],
)
def test_a_bad_web_table_stops_it_with_one_line(tmp_path, capsys, table, key) -> None:
    config = tmp_path / "buildq.toml"
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path / "x.db"}"\n\n{table}')
    config.chmod(0o600)
    result = run_cli(["web", "--config", str(config)], capsys)
    assert result.refused_cleanly() and result.code == 2, result.err
    assert f"config {key}" in result.err and "short" not in result.err
