"""Supervisor of one ``command`` build, and the file layout it shares with the runner.

The runner starts this script (``python -I _command_supervisor.py BUILD_DIR GRACE_S COMMAND``)
in a session of its own, so it outlives the daemon. It runs the command in a new process group,
turns a SIGTERM (the runner's cancel) into SIGTERM-then-SIGKILL of that group, waits until the
group is gone, and records the outcome in an exit file written atomically. The exit file is
how a build's result survives any number of daemon restarts.

Standard library only, and run by path with ``-I``: it must start even if the daemon's
environment changes while builds run, and quickly.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

REQUEST_FILE = "request.json"
LOG_FILE = "build.log"
STARTED_FILE = "started"
WRAPPER_PID_FILE = "wrapper.pid"
COMMAND_PID_FILE = "command.pid"
CANCEL_FILE = "cancel"
EXIT_FILE = "exit.json"
WORKSPACE_DIR = "workspace"

_PR_SET_CHILD_SUBREAPER = 36
_GROUP_POLL_S = 0.02
# After SIGKILL the kernel needs a moment to tear the processes down.
_AFTER_KILL_S = 5.0


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def write_atomic(path: Path, text: str) -> None:
    """Readers see the old content or the new, never a torn write."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    staging.write_text(text)
    os.replace(staging, path)


def process_identity(pid: int) -> str | None:
    """What tells a live process from any later one given the same pid; None if gone or a zombie.

    Boot id plus start time (clock ticks since boot): start times alone repeat across reboots.
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses; it ends at the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return f"{boot_id}/{fields[19]}"


def write_pid_file(path: Path, pid: int) -> None:
    identity = process_identity(pid)
    # A process that already ended has nothing left to identify; its exit record says the rest.
    if identity is not None:
        write_atomic(path, f"{pid} {identity}\n")


def read_pid_file(path: Path) -> tuple[int, str] | None:
    try:
        pid, identity = path.read_text().split()
        return int(pid), identity
    except (FileNotFoundError, ValueError):
        return None


class _Supervisor:
    def __init__(self, build_dir: Path, grace_s: float) -> None:
        self.build_dir = build_dir
        self.grace_s = grace_s
        self.pgid: int | None = None
        self.cancel_requested = False
        self._term_sent = False
        self._kill_timer: threading.Timer | None = None

    def on_sigterm(self, _signum: int, _frame: FrameType | None) -> None:
        self.cancel_requested = True
        self._stop_group()

    def run(self, command: str) -> int | None:
        if self.cancel_requested or (self.build_dir / CANCEL_FILE).exists():
            self.cancel_requested = True
            return None
        workspace = self.build_dir / WORKSPACE_DIR
        workspace.mkdir(exist_ok=True)
        child = subprocess.Popen(
            ["/bin/sh", "-c", command], cwd=workspace, stdin=subprocess.DEVNULL, process_group=0
        )
        self.pgid = child.pid
        write_pid_file(self.build_dir / COMMAND_PID_FILE, child.pid)
        # A cancel may have come before the group existed (signal or, after a daemon crash
        # mid-start, only the file): act on it now.
        if self.cancel_requested or (self.build_dir / CANCEL_FILE).exists():
            self.cancel_requested = True
            self._stop_group()
        returncode = child.wait()
        self._clear_group()
        return returncode

    def _stop_group(self) -> None:
        if self.pgid is None or self._term_sent:
            return
        self._term_sent = True
        _signal_group(self.pgid, signal.SIGTERM)
        self._kill_timer = threading.Timer(self.grace_s, _signal_group, (self.pgid, signal.SIGKILL))
        self._kill_timer.daemon = True
        self._kill_timer.start()

    def _clear_group(self) -> None:
        """Leave nothing of the build behind: what the command left running gets stopped too."""
        assert self.pgid is not None
        self._stop_group()
        if not self._wait_group_gone(self.grace_s + _AFTER_KILL_S):
            _signal_group(self.pgid, signal.SIGKILL)
            self._wait_group_gone(_AFTER_KILL_S)
        if self._kill_timer is not None:
            self._kill_timer.cancel()

    def _wait_group_gone(self, timeout_s: float) -> bool:
        assert self.pgid is not None
        deadline = time.monotonic() + timeout_s
        while True:
            _reap_children()
            try:
                os.killpg(self.pgid, 0)
            except ProcessLookupError:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_GROUP_POLL_S)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _reap_children() -> None:
    """Reap orphans of the build that were re-parented to us (we are their subreaper)."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _become_subreaper() -> None:
    # Orphans of the build then become our children instead of init's. Not every init reaps
    # (containers), and an unreaped zombie keeps its process group alive forever.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    build_dir, grace_s, command = Path(argv[0]), float(argv[1]), argv[2]
    supervisor = _Supervisor(build_dir, grace_s)
    # No SIGHUP/SIGINT handling: the runner starts us in a new session, without a terminal.
    signal.signal(signal.SIGTERM, supervisor.on_sigterm)
    write_pid_file(build_dir / WRAPPER_PID_FILE, os.getpid())
    _become_subreaper()
    record: dict[str, object] = {"exit_code": None}
    try:
        record["exit_code"] = supervisor.run(command)
    except OSError as err:
        record["error"] = f"could not start the build command: {err}"
    record.update(cancelled=supervisor.cancel_requested, finished_at_ms=now_ms())
    write_atomic(build_dir / EXIT_FILE, json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
