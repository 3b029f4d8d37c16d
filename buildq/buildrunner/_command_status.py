"""What a ``command`` build's directory says: its status and metadata, and whether it runs.

The runner (``command``) and the supervisor (``_command_supervisor``) write the directory;
this reads it, from any process on the host, so whichever runner instance is asked answers
the same. A build whose supervisor died without an exit record is lost (FAILED, ``lost``).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from buildq.buildrunner import _command_supervisor as supervisor
from buildq.buildrunner.contract import BuildMetadata, BuildStatus

# A build marked started whose supervisor has not recorded its pid yet is still starting up;
# past this age, the daemon that was starting it died before it could.
_START_TIMEOUT_MS = 60_000


def _supervisor_alive(build_dir: Path, started_ms: int) -> bool:
    record = supervisor.read_pid_file(build_dir / supervisor.WRAPPER_PID_FILE)
    if record is None:
        return supervisor.now_ms() - started_ms < _START_TIMEOUT_MS
    pid, identity = record
    return supervisor.process_identity(pid) == identity


def is_running(build_dir: Path) -> bool:
    """Whether the build holds a slot: started, no exit record, its supervisor alive."""
    started_ms = _read_int(build_dir / supervisor.STARTED_FILE)
    if started_ms is None:
        # "active" is written before "started": a daemon died in between, or is there now.
        return False
    if (build_dir / supervisor.EXIT_FILE).exists():
        return False
    return _supervisor_alive(build_dir, started_ms)


def read_status(build_dir: Path) -> tuple[BuildStatus, BuildMetadata]:
    """The build's status and metadata (log URL, times, exit code, why it failed)."""
    meta: BuildMetadata = {"url": (build_dir / supervisor.LOG_FILE).as_uri()}
    cancelled_ms = _read_int(build_dir / supervisor.CANCEL_FILE)
    started_ms = _read_int(build_dir / supervisor.STARTED_FILE)
    if started_ms is None:
        if cancelled_ms is not None:
            meta.update(native_state="cancelled", failure_reason="cancelled")
            meta["finished_at"] = _iso(cancelled_ms)
            return BuildStatus.CANCELLED, meta
        meta["native_state"] = "waiting"
        return BuildStatus.ACCEPTED, meta
    meta["started_at"] = _iso(started_ms)
    exit_record = _read_json(build_dir / supervisor.EXIT_FILE)
    if exit_record is None and _supervisor_alive(build_dir, started_ms):
        meta["native_state"] = "cancelling" if cancelled_ms is not None else "running"
        meta["duration_s"] = _seconds(supervisor.now_ms() - started_ms)
        return BuildStatus.RUNNING, meta
    # The supervisor writes its record and then exits: read again, it may have just done so.
    exit_record = exit_record or _read_json(build_dir / supervisor.EXIT_FILE)
    if exit_record is None:
        if cancelled_ms is not None:
            meta.update(native_state="cancelled", failure_reason="cancelled")
            return BuildStatus.CANCELLED, meta
        meta.update(native_state="lost", failure_reason="lost")
        return BuildStatus.FAILED, meta
    return _finished(meta, exit_record, started_ms)


def _finished(
    meta: BuildMetadata, record: dict[str, Any], started_ms: int
) -> tuple[BuildStatus, BuildMetadata]:
    finished_ms = int(record["finished_at_ms"])
    meta["finished_at"] = _iso(finished_ms)
    meta["duration_s"] = _seconds(finished_ms - started_ms)
    code = record.get("exit_code")
    if isinstance(code, int):
        # Popen reports death by signal N as -N; shells and CI logs say 128 + N.
        meta["exit_code"] = str(code if code >= 0 else 128 - code)
    if record.get("cancelled"):
        meta.update(native_state="cancelled", failure_reason="cancelled")
        return BuildStatus.CANCELLED, meta
    if code == 0:
        meta["native_state"] = "exited"
        return BuildStatus.SUCCEEDED, meta
    if "error" in record:
        meta.update(native_state="error", failure_reason="infra", error=str(record["error"]))
        return BuildStatus.FAILED, meta
    meta.update(native_state="exited", failure_reason="verdict")
    return BuildStatus.FAILED, meta


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return document if isinstance(document, dict) else None


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds")


def _seconds(ms: int) -> str:
    return f"{ms / 1000:.3f}"
