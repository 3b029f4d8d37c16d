"""The ``command`` runner: a real build on this host, one shell command per build.

For local runs where a build should actually do something (run a test suite, a script) and
for testing buildq against real processes. Each build gets a directory under ``work_dir``
holding its request (the changes, as the JSON file the command reads), its log, and the
records of its life. A small supervisor (``_command_supervisor``) runs the command in a session
of its own, so builds keep running while the daemon restarts, and writes the exit code to a
file. Every fact lives in those files: any runner instance, in any process on this host, can
answer for any build, and whichever runner calls ``trigger`` or ``status`` next starts the
builds waiting for a free slot.

Runner instances on one host coordinate through an ``flock`` on ``work_dir/.lock``; the
directory must be on a local filesystem and is not shared between hosts. Linux only: process
identity is checked in ``/proc`` (pid, start time and boot id: a reused pid is never taken for a
build).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from buildq.buildrunner import _command_supervisor as supervisor
from buildq.buildrunner import registry
from buildq.buildrunner._command_status import is_running, read_status
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
)
from buildq.config.base import ConfigError, Table

_ID_PATTERN = re.compile(r"cmd-[0-9]{13,16}-[0-9a-f]{12}")

_DAEMON_ONLY_ENV = frozenset(
    {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"}
)


@dataclass(frozen=True, slots=True)
class CommandConfig:
    """``[runners.<name>]`` with ``type = "command"``."""

    command: str
    work_dir: Path
    max_parallel: int = 2
    cancel_grace_s: float = 10.0

    @classmethod
    def from_table(cls, table: Table) -> CommandConfig:
        work_dir = Path(table.str("work_dir")).expanduser()
        if work_dir.exists() and not work_dir.is_dir():
            raise ConfigError(table.key("work_dir"), str(work_dir), "a directory")
        config = cls(
            command=table.str("command"),
            # Resolved once at start-up: builds must not move if the daemon changes directory.
            work_dir=work_dir.absolute(),
            max_parallel=table.int("max_parallel", 2, min=1),
            cancel_grace_s=table.float("cancel_grace_s", 10.0, min=0.0),
        )
        table.reject_unknown()
        return config


class CommandRunner:
    """A BuildRunner that runs ``config.command`` locally, at most ``max_parallel`` at once."""

    def __init__(self, config: CommandConfig) -> None:
        self.config = config
        self._root = config.work_dir
        self._builds = self._root / "builds"
        self._waiting = self._root / "waiting"  # one empty file per build waiting for a slot
        self._active = self._root / "active"  # one per started build not yet seen finished
        self._tokens = self._root / "tokens"  # correlation token hash -> symlink to build id
        for directory in (self._builds, self._waiting, self._active, self._tokens):
            directory.mkdir(parents=True, exist_ok=True)
        self._thread_lock = threading.Lock()
        # Supervisors we started, kept only to reap them; a restart hands them to init.
        self._children: list[subprocess.Popen[bytes]] = []

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        metadata = dict(metadata or {})
        token = metadata.get(CORRELATION_KEY)
        with self._locked():
            existing = self._build_for_token(token) if token is not None else None
            if existing is None:
                build_id = self._create(queue, base, head, metadata)
                if token is None or self._claim_token(token, build_id):
                    (self._waiting / build_id.id).touch()
                    self._start_waiting()
                    return build_id
                # Only reachable if something bypassed the lock; the first claim wins.
                shutil.rmtree(self._builds / build_id.id)
                existing = self._build_for_token(token)
                assert existing is not None
            self._start_waiting()
            return existing

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        build_dir = self._build_dir(build_id)
        with self._locked():
            self._start_waiting()
            return read_status(build_dir)

    def cancel(self, build_id: BuildID) -> None:
        build_dir = self._build_dir(build_id)
        with self._locked():
            if read_status(build_dir)[0].is_terminal:
                return
            with contextlib.suppress(FileExistsError):
                _create_exclusive(build_dir / supervisor.CANCEL_FILE, str(supervisor.now_ms()))
            if not (build_dir / supervisor.STARTED_FILE).exists():
                (self._waiting / build_id.id).unlink(missing_ok=True)
                return
            # The supervisor escalates to SIGKILL after the grace period, so we return now and
            # a daemon restart in the meantime changes nothing.
            pid_record = supervisor.read_pid_file(build_dir / supervisor.WRAPPER_PID_FILE)
            if pid_record is not None:
                _signal_verified(*pid_record, signal.SIGTERM)

    def _create(
        self, queue: str, base: Sequence[Change], head: Sequence[Change], metadata: BuildMetadata
    ) -> BuildID:
        """Write the build's request: the file its command reads, and what makes it exist."""
        build_id = BuildID(f"cmd-{supervisor.now_ms()}-{secrets.token_hex(6)}")
        build_dir = self._builds / build_id.id
        build_dir.mkdir()
        request = {
            "build_id": build_id.id,
            "queue": queue,
            "base": [change.to_json() for change in base],
            "head": [change.to_json() for change in head],
            "metadata": metadata,
        }
        text = json.dumps(request, ensure_ascii=False, indent=2)
        supervisor.write_atomic(build_dir / supervisor.REQUEST_FILE, text)
        return build_id

    # -- scheduling -----------------------------------------------------------------------

    def _start_waiting(self) -> None:
        """Free the slots of finished builds and start waiting builds in them, oldest first."""
        self._children = [child for child in self._children if child.poll() is None]
        running = 0
        for entry in self._active.iterdir():
            if is_running(self._builds / entry.name):
                running += 1
            else:
                _kill_lost_group(self._builds / entry.name)
                entry.unlink(missing_ok=True)
        free = self.config.max_parallel - running
        for entry in sorted(self._waiting.iterdir()):
            build_dir = self._builds / entry.name
            # A cancelled entry, or one a crashed runner started but did not dequeue, just goes.
            done = [supervisor.CANCEL_FILE, supervisor.STARTED_FILE]
            if not any((build_dir / name).exists() for name in done):
                if free <= 0:
                    break
                self._start(build_dir)
                free -= 1
            entry.unlink(missing_ok=True)

    def _start(self, build_dir: Path) -> None:
        # Ordered so that a crash at any point leaves a build the next runner can account for:
        # "active" first (it holds the slot), then "started", then the process.
        (self._active / build_dir.name).touch()
        supervisor.write_atomic(build_dir / supervisor.STARTED_FILE, str(supervisor.now_ms()))
        request = json.loads((build_dir / supervisor.REQUEST_FILE).read_text())
        # The daemon's systemd channels are not the build's: a build that inherited them could
        # send READY/WATCHDOG on the daemon's behalf (NotifyAccess=main ignores it, but still).
        inherited = {k: v for k, v in os.environ.items() if k not in _DAEMON_ONLY_ENV}
        env = inherited | {
            "BUILDQ_BUILD_ID": build_dir.name,
            "BUILDQ_QUEUE": request["queue"],
            "BUILDQ_CHANGES_FILE": str(build_dir / supervisor.REQUEST_FILE),
        }
        argv = [sys.executable, "-I", supervisor.__file__, str(build_dir)]
        argv += [str(self.config.cancel_grace_s), self.config.command]
        try:
            with open(build_dir / supervisor.LOG_FILE, "ab") as log:
                child = subprocess.Popen(
                    argv,
                    cwd=build_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as err:
            record = {
                "error": f"could not start the supervisor: {err}",
                "finished_at_ms": supervisor.now_ms(),
            }
            supervisor.write_atomic(build_dir / supervisor.EXIT_FILE, json.dumps(record))
            return
        self._children.append(child)
        # The supervisor writes this too; whichever comes first closes the window in which a
        # crash would leave a running build nobody can identify.
        supervisor.write_pid_file(build_dir / supervisor.WRAPPER_PID_FILE, child.pid)

    # -- files ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock:
            fd = os.open(self._root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)

    def _build_dir(self, build_id: BuildID) -> Path:
        # The id becomes a path: only our own id shape may reach the filesystem.
        if not _ID_PATTERN.fullmatch(build_id.id):
            raise BuildNotFound(f"not a command build id: {build_id.id!r}")
        build_dir = self._builds / build_id.id
        if not (build_dir / supervisor.REQUEST_FILE).is_file():
            raise BuildNotFound(f"no command build {build_id.id!r} under {self._root}")
        return build_dir

    def _token_path(self, token: str) -> Path:
        return self._tokens / hashlib.sha256(token.encode()).hexdigest()

    def _claim_token(self, token: str, build_id: BuildID) -> bool:
        try:
            os.symlink(build_id.id, self._token_path(token))
        except FileExistsError:
            return False
        return True

    def _build_for_token(self, token: str) -> BuildID | None:
        try:
            build_id = BuildID(os.readlink(self._token_path(token)))
        except FileNotFoundError:
            return None
        build_dir = self._builds / build_id.id
        # A crash between claiming the token and queueing the build would leave it stranded;
        # the retried trigger finishes the job.
        pending = [supervisor.STARTED_FILE, supervisor.CANCEL_FILE, supervisor.EXIT_FILE]
        if not any((build_dir / name).exists() for name in pending):
            (self._waiting / build_id.id).touch()
        return build_id


def _create_exclusive(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as out:
        out.write(text)


def _signal_verified(pid: int, identity: str, sig: signal.Signals) -> bool:
    """Signal ``pid`` only if it is still the process recorded, never a reuse of its pid."""
    try:
        # An open pidfd pins the process: the check and the signal cannot straddle a reuse.
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        if supervisor.process_identity(pid) != identity:
            return False
        signal.pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)


def _kill_group_verified(pgid: int, identity: str) -> None:
    try:
        pidfd = os.pidfd_open(pgid)
    except ProcessLookupError:
        return
    try:
        # The leader's pidfd keeps its pid, and so its group id, from being reused meanwhile.
        if supervisor.process_identity(pgid) == identity:
            os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    finally:
        os.close(pidfd)


def _kill_lost_group(build_dir: Path) -> None:
    """A build whose supervisor died is recorded lost; what it left running must stop too."""
    if (build_dir / supervisor.EXIT_FILE).exists():
        return
    record = supervisor.read_pid_file(build_dir / supervisor.COMMAND_PID_FILE)
    if record is not None:
        _kill_group_verified(*record)


def _runner(_name: str, config: CommandConfig) -> CommandRunner:
    return CommandRunner(config)


RUNNER_KIND = registry.RunnerKind("command", CommandConfig.from_table, _runner)
