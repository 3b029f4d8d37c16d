"""The faults a chaos run injects, and the record of when each happened.

Every fault is recorded with its time window; the audit later explains each redelivery and
each dead letter by one of these windows, and anything it cannot explain is a finding.

- ``kill``: SIGKILL a random daemon, start it again at once.
- ``pause``: SIGSTOP a daemon past its lease and visibility timeout, then SIGCONT.
- ``db_outage``: the database goes away and comes back, either through the TCP proxy
  (``ProxyOutage``: a real outage for the daemons, the shared server keeps running) or by
  stopping and starting the real MariaDB server (``ServerRestart``, ``make chaos`` only).
- ``status_fault``: the ``sim`` runner of one queue fails every ``status`` call for a while.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.chaos.cluster import Node
from tests.support import wait_until


@dataclass
class Window:
    kind: str
    start: float  # epoch s
    end: float = float("inf")
    detail: str = ""

    def overlaps(self, start: float, end: float, slack: float = 0.0) -> bool:
        return start <= self.end + slack and end >= self.start - slack


@dataclass
class FaultLog:
    windows: list[Window] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, kind: str, detail: str = "") -> Window:
        window = Window(kind, time.time(), detail=detail)
        with self._lock:
            self.windows.append(window)
        return window

    def of(self, kind: str) -> list[Window]:
        with self._lock:
            return [w for w in self.windows if w.kind == kind]

    def count(self, kind: str) -> int:
        return len(self.of(kind))


class Outage(Protocol):
    def begin(self) -> None: ...
    def end(self) -> None: ...


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


class ProxyOutage:
    """The TCP proxy between the daemons and MariaDB, run as its own process."""

    def __init__(self, target: str, workdir: Path) -> None:
        port_file = workdir / "proxy.port"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.chaos.proxy", target, str(port_file)],
            cwd=Path(__file__).resolve().parents[2],
        )
        wait_until(
            lambda: port_file.exists() and port_file.read_text(), timeout=30, message="proxy port"
        )
        self.port = int(port_file.read_text())

    def begin(self) -> None:
        self.process.send_signal(signal.SIGUSR1)
        wait_until(lambda: not port_open("127.0.0.1", self.port), timeout=10, message="proxy cut")

    def end(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout=10, message="proxy back")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


class ServerRestart:
    """Stop the real MariaDB server and start it again (``make chaos`` only).

    ``end`` always leaves a running server behind; ``ensure_running`` is for ``finally``.
    """

    START = ["start-stop-daemon", "--start", "--oknodo", "--background", "--exec"]

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.binary = shutil.which("mariadbd") or "/usr/sbin/mariadbd"

    def begin(self) -> None:
        subprocess.run(
            ["mariadb-admin", "-uroot", f"-h{self.host}", f"-P{self.port}", "shutdown"],
            check=True,
            timeout=120,
        )
        wait_until(lambda: not port_open(self.host, self.port), timeout=60, message="db down")

    def end(self) -> None:
        self.ensure_running()

    def ensure_running(self) -> None:
        if port_open(self.host, self.port):
            return
        subprocess.run([*self.START, self.binary], check=True, timeout=60)
        wait_until(lambda: port_open(self.host, self.port), timeout=120, message="db up again")


@dataclass
class Schedule:
    """When the faults happen, in seconds from the start of the run."""

    duration_s: float
    kill_every_s: tuple[float, float] = (3.0, 6.0)
    pause_at_s: float = 12.0
    pause_for_s: float = 7.0
    outage_at_s: float = 30.0
    outage_for_s: float = 10.0
    status_fault_at_s: float = 50.0
    status_fault_for_s: float = 6.0


class Injector:
    """Runs the schedule on its own threads until ``stop``."""

    def __init__(
        self,
        nodes: list[Node],
        outage: Outage,
        status_fault_file: Path,
        schedule: Schedule,
        log: FaultLog,
        rng: random.Random,
        on_outage: Sequence[Callable[[str], None]] = (),
    ) -> None:
        self.nodes = nodes
        self.outage = outage
        self.fault_file = status_fault_file
        self.schedule = schedule
        self.log = log
        self.rng = rng
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # one process-level action at a time
        self._threads: list[threading.Thread] = []
        self.outage_hooks = on_outage
        self.errors: list[str] = []

    def start(self) -> None:
        self.t0 = time.monotonic()
        for name, target in (
            ("kills", self._kills),
            ("pause", self._pause),
            ("outage", self._outage),
            ("status", self._status_fault),
        ):
            thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as err:  # a harness failure must surface in the report
            self.errors.append(f"{type(err).__name__}: {err}")

    def _sleep_until(self, at_s: float) -> bool:
        """Wait until ``at_s`` into the run; False if the run stopped first."""
        return not self.stopping.wait(max(0.0, at_s - (time.monotonic() - self.t0)))

    def _elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _kills(self) -> None:
        while self._sleep_until(self._elapsed() + self.rng.uniform(*self.schedule.kill_every_s)):
            if self._elapsed() >= self.schedule.duration_s:
                return
            with self._lock:
                candidates = [n for n in self.nodes if not n.paused and n.alive()]
                if not candidates:
                    continue
                node = self.rng.choice(candidates)
                window = self.log.open("kill", f"{node.name} pid {node.current.pid}")
                node.kill()
                window.end = time.time()
                node.spawn()

    def _pause(self) -> None:
        if not self._sleep_until(self.schedule.pause_at_s):
            return
        with self._lock:
            candidates = [n for n in self.nodes if n.alive()]
            node = self.rng.choice(candidates)
            window = self.log.open("pause", f"{node.name} pid {node.current.pid}")
            node.pause()
        try:
            self.stopping.wait(self.schedule.pause_for_s)
        finally:
            with self._lock:
                if node.paused:
                    node.resume()
                window.end = time.time()

    def _outage(self) -> None:
        if not self._sleep_until(self.schedule.outage_at_s):
            return
        window = self.log.open("db_outage")
        for hook in self.outage_hooks:
            hook("begin")
        try:
            self.outage.begin()
            self.stopping.wait(self.schedule.outage_for_s)
        finally:
            self.outage.end()
            window.end = time.time()
            for hook in self.outage_hooks:
                with contextlib.suppress(Exception):
                    hook("end")

    def _status_fault(self) -> None:
        if not self._sleep_until(self.schedule.status_fault_at_s):
            return
        window = self.log.open("status_fault")
        self.fault_file.touch()
        try:
            self.stopping.wait(self.schedule.status_fault_for_s)
        finally:
            self.fault_file.unlink(missing_ok=True)
            window.end = time.time()
