"""The wheel sets up a host by itself (issue 15, item 5): built from this tree, installed with
pip into a fresh virtualenv, it writes its config and unit (``buildq setup-host``), migrates
(``buildq db upgrade``) and runs (``buildq run``), with no checkout in sight."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import IN_CI, REPO
from tests.support.waiting import wait_until


def _run(*argv: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (argv, done.stdout[-3000:], done.stderr[-3000:])
    return done


def _source_copy(into: Path) -> Path:
    """The files git would commit (tracked, or new and not ignored): a build of the tree as
    it is, without touching the checkout (setuptools writes build/ and *.egg-info next to
    the sources)."""
    listed = _run("git", "ls-files", "-co", "--exclude-standard", "-z", cwd=REPO).stdout
    for name in filter(None, listed.split("\0")):
        source = REPO / name
        if source.is_file():
            target = into / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return into


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = _source_copy(tmp / "src")
    _run(
        sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp / "dist", source, cwd=tmp
    )
    [built] = (tmp / "dist").glob("buildq-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_carries_what_a_host_needs(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("buildq/host/buildq.service", "buildq/host/buildq.toml", "buildq/py.typed"):
        assert needed in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "bench/", "config/")) for n in names)


@pytest.mark.slow
def test_pip_install_then_setup_host_upgrade_and_run(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    _run(venv / "bin" / "pip", "install", "-q", wheel, cwd=tmp_path)
    buildq = venv / "bin" / "buildq"
    assert _run(buildq, "--version", cwd=tmp_path).stdout.strip() == "buildq 0.1.0"

    host = tmp_path / "host"
    config, unit = host / "etc" / "buildq.toml", host / "units" / "buildq.service"
    _run(
        buildq,
        "setup-host",
        "--config-dir",
        config.parent,
        "--unit-dir",
        unit.parent,
        "--state-dir",
        host / "state",
        cwd=tmp_path,
    )
    assert f"ExecStart={buildq} run --config" in unit.read_text()
    assert oct(config.stat().st_mode & 0o777) == "0o640"
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        verified = subprocess.run([analyze, "verify", unit], capture_output=True, text=True)
        assert verified.returncode == 0 and verified.stdout + verified.stderr == "", verified
    elif IN_CI:
        pytest.fail("systemd-analyze is missing, but CI=true: .ci/run installs it")

    upgraded = _run(buildq, "db", "upgrade", "--config", config, cwd=tmp_path)
    assert "is at revision" in upgraded.stdout and "(the latest)" in upgraded.stdout
    log = tmp_path / "daemon.log"
    with log.open("wb") as out:
        daemon = subprocess.Popen(
            [buildq, "run", "--config", config],
            cwd=tmp_path,
            stderr=out,
            env={**os.environ, "BUILDQ_HTTP__PORT": "0"},  # 9464 may be taken on this machine
        )
    try:
        wait_until(lambda: '"daemon_ready"' in log.read_text(), timeout=60, message="ready")
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    doctor = subprocess.run(
        [buildq, "doctor", "--config", config, "--offline"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert doctor.returncode == 0, doctor.stdout
