"""The shipped systemd units under ``systemd-analyze``, and sd_notify datagrams on a socket."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import IN_CI
from tests.support.daemon import BUILDQ

#: ExecStart's binary in the shipped units.
SHIPPED_BUILDQ = "/opt/buildq/venv/bin/buildq"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        reason = "systemd-analyze is not installed (Debian package: systemd)"
        if IN_CI:
            pytest.fail(f"{reason}, but CI=true: .ci/run installs it")
        pytest.skip(reason)
    return path


def local_copy(unit: Path, directory: Path) -> Path:
    """The shipped ``unit``, with ExecStart pointed at this venv (verify checks the binary
    exists), written into ``directory``."""
    text = unit.read_text()
    assert SHIPPED_BUILDQ in text, f"ExecStart of {unit} moved: update SHIPPED_BUILDQ"
    copy = directory / unit.name
    copy.write_text(text.replace(SHIPPED_BUILDQ, BUILDQ))
    return copy


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify``. It exits 0 on unknown keys and bad values (it only prints
    them), so a clean unit is exit 0 with no output."""
    return subprocess.run(
        [systemd_analyze(), "verify", str(unit)], capture_output=True, text=True, timeout=60
    )


def security(unit: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze security --offline`` with an exposure threshold of 2.0 (20 tenths):
    exit 0 while the unit's exposure is at most that. Skipped before systemd 250."""
    analyze = systemd_analyze()
    help_text = subprocess.run([analyze, "security", "--help"], capture_output=True, text=True)
    if "--offline" not in help_text.stdout:
        pytest.skip("systemd-analyze security --offline needs systemd 250 or newer")
    return subprocess.run(
        [analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def unit_settings(unit_text: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, the values of a key in order."""
    settings: dict[str, list[str]] = {}
    for line in unit_text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def receive(sock: socket.socket, wanted: str, deadline: float) -> list[str]:
    """Datagrams up to and including the first with ``wanted`` among its lines."""
    seen = []
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            message = sock.recv(4096).decode()
        except TimeoutError:
            raise AssertionError(f"no {wanted} before the deadline; got {seen}") from None
        seen.append(message)
        if wanted in message.splitlines():
            return seen
