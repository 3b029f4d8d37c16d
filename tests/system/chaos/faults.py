"""The faults a chaos run injects, and the record of when each happened.

Every fault is recorded with its time window; the audit later explains each redelivery and
each dead letter by one of these windows, and anything it cannot explain is a finding.

- ``kill``: SIGKILL a random daemon, start it again at once.
- ``pause``: SIGSTOP a daemon past its lease and visibility timeout, then SIGCONT.
- ``db_outage``: the database goes away and comes back, either through the TCP proxy
  (``ProxyOutage``: a real outage for the daemons, the shared server keeps running) or by
  stopping and starting the real MariaDB server (``ServerRestart``, ``make chaos`` only).
- ``status_fault``: the ``sim`` runner of one queue fails every ``status`` call for a while.
- ``clock_step``: one daemon's wall clock (``time.time`` in its process, through the shim of
  tests/support/shims) jumps two hours ahead, and back at the end of the window. Nothing may notice:
  deadlines are measured on the database's clock, advanced by the monotonic one.
- ``disk_full``: the database refuses every write of some daemons (the shim fails their write
  statements with MariaDB's "disk full", error 1021) for a while; ``nodes`` names them. A
  storage fault the operator can fix: retried, never a failure. The kills go on, but spare one
  of them (``witness``), so that a daemon rides the whole phase out without a restart. The
  CI calls of one runner are held from just before the disk fills until just after, so the
  hand-offs of the polls they answer meet the full disk on every daemon.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tests.support import REPO
from tests.support.waiting import wait_until
from tests.system.chaos.cluster import Node


@dataclass
class Window:
    kind: str
    start: float  # epoch s
    end: float = float("inf")
    detail: str = ""
    #: The daemons it affects, where that is not all of them or one by its pid.
    nodes: tuple[str, ...] = ()
    #: The affected daemon no kill may hit during the window.
    witness: str = ""

    def overlaps(self, start: float, end: float, slack: float = 0.0) -> bool:
        return start <= self.end + slack and end >= self.start - slack


@dataclass
class FaultLog:
    windows: list[Window] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, kind: str, detail: str = "", **extra: Any) -> Window:
        window = Window(kind, time.time(), detail=detail, **extra)
        with self._lock:
            self.windows.append(window)
        return window

    @contextlib.contextmanager
    def window(self, kind: str, detail: str = "", **extra: Any) -> Iterator[Window]:
        """A fault's window, open while the block runs and closed however it ends."""
        window = self.open(kind, detail, **extra)
        try:
            yield window
        finally:
            window.end = time.time()

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
            [sys.executable, "-m", "tests.support.tcp_proxy", target, str(port_file)],
            cwd=REPO,
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
    clock_step_at_s: float = 5.0
    clock_step_for_s: float = 40.0
    clock_step_s: float = 2 * 3600.0
    disk_full_at_s: float = 6.0
    disk_full_for_s: float = 10.0
    #: How many daemons' writes fail; 0: all of them (the database's disk is everyone's).
    disk_full_nodes: int = 0
    #: The held CI calls are held from this long before the disk fills to this long after.
    hold_calls_s: float = 1.0

    def phases(self) -> dict[str, tuple[float, float]]:
        """When each phase (every fault but the kills) starts, and how long it lasts, in s."""
        return {
            "pause": (self.pause_at_s, self.pause_for_s),
            "db_outage": (self.outage_at_s, self.outage_for_s),
            "status_fault": (self.status_fault_at_s, self.status_fault_for_s),
            "clock_step": (self.clock_step_at_s, self.clock_step_for_s),
            "disk_full": (self.disk_full_at_s, self.disk_full_for_s),
        }

    def phases_end_s(self) -> float:
        """When the last phase is over."""
        return max(at_s + for_s for at_s, for_s in self.phases().values())


#: A phase's fault: injected on entering the context, lifted on leaving it, whatever happens.
Fault = Callable[[], AbstractContextManager[object]]


class Injector:
    """Runs the schedule on its own threads until ``stop``: the kills, and one thread per phase,
    each played by the same driver (``_phase``)."""

    def __init__(
        self,
        nodes: list[Node],
        outage: Outage,
        status_fault_file: Path,
        schedule: Schedule,
        log: FaultLog,
        rng: random.Random,
        hold_calls_file: Path | None = None,
    ) -> None:
        self.nodes = nodes
        self.hold_file = hold_calls_file
        self.outage = outage
        self.fault_file = status_fault_file
        self.schedule = schedule
        self.log = log
        self.rng = rng
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # one process-level action at a time
        self._threads: list[threading.Thread] = []
        self.errors: list[str] = []
        #: Steps of a daemon's wall clock made (ahead and back count one each).
        self.clock_steps = 0
        #: Daemons the kills leave alone for now (a phase's witness).
        self.spared: set[str] = set()

    def start(self) -> None:
        self.t0 = time.monotonic()
        faults: dict[str, Fault] = {
            "pause": self._pause,
            "db_outage": self._outage,
            "status_fault": self._status_fault,
            "clock_step": self._clock_step,
            "disk_full": self._disk_full,
        }
        self._spawn("kills", self._kills)
        for name, (at_s, for_s) in self.schedule.phases().items():
            self._spawn(name, functools.partial(self._phase, at_s, for_s, faults[name]))
        if self.hold_file is not None:  # from just before the disk fills until just after
            hold_s = self.schedule.hold_calls_s
            at_s = self.schedule.disk_full_at_s - hold_s
            self._spawn(
                "hold_calls", functools.partial(self._phase, at_s, 2 * hold_s, self._hold_calls)
            )

    def stop(self) -> None:
        """Let every phase play out (each ends by itself), then stop the kills."""
        left_s = self.schedule.phases_end_s() - self._elapsed()
        for thread in self._threads:
            if thread.name != "kills":  # the kills go on until told
                thread.join(timeout=max(0.0, left_s) + 60)
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=180)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=self._guard, args=(target,), name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _guard(self, target: Callable[[], None]) -> None:
        try:
            target()
        except Exception as err:  # a harness failure must surface in the report
            self.errors.append(f"{type(err).__name__}: {err}")

    def _phase(self, at_s: float, for_s: float, fault: Fault) -> None:
        """One phase: its fault injected ``at_s`` into the run and lifted ``for_s`` later (or
        as soon as the run stops)."""
        if not self._sleep_until(at_s):
            return
        with fault():
            self._sleep_until(at_s + for_s)

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
                candidates = [
                    n
                    for n in self.nodes
                    if not n.paused and n.alive() and n.name not in self.spared
                ]
                if not candidates:
                    continue
                node = self.rng.choice(candidates)
                window = self.log.open("kill", f"{node.name} pid {node.current.pid}")
                node.kill()
                window.end = time.time()
                node.spawn()

    @contextlib.contextmanager
    def _pause(self) -> Iterator[None]:
        with self._lock:
            node = self.rng.choice([n for n in self.nodes if n.alive()])
            window = self.log.open("pause", f"{node.name} pid {node.current.pid}")
            node.pause()
        try:
            yield
        finally:
            with self._lock:
                if node.paused:
                    node.resume()
                window.end = time.time()

    @contextlib.contextmanager
    def _outage(self) -> Iterator[None]:
        with self.log.window("db_outage"):
            try:
                self.outage.begin()
                yield
            finally:
                self.outage.end()

    @contextlib.contextmanager
    def _status_fault(self) -> Iterator[None]:
        with self.log.window("status_fault"):
            self.fault_file.touch()
            try:
                yield
            finally:
                self.fault_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _clock_step(self) -> Iterator[None]:
        node = self.rng.choice(self.nodes)
        step_s = self.schedule.clock_step_s
        with self.log.window("clock_step", f"{node.name} {step_s:+g}s"):
            _write_atomically(node.clock_step_file, str(step_s))
            self.clock_steps += 1
            try:
                self._confirm_step(node, step_s)
                yield
            finally:
                _write_atomically(node.clock_step_file, "0")  # and back, as NTP would correct it
                self.clock_steps += 1

    def _confirm_step(self, node: Node, step_s: float) -> None:
        """The step is in effect in the daemon: the time its /metrics says it last read the
        database gauges (``time.time()`` in its process) is ahead by about the step. Without
        this a phase whose shim did nothing would pass for a fault survived."""

        def stepped() -> bool:
            refreshed = node.metric("buildq_stats_refreshed_timestamp_seconds")
            return refreshed is not None and refreshed > time.time() + step_s / 2

        try:  # the gauges are read at start-up and every 10 s; a kill may come in between
            wait_until(lambda: stepped() or self.stopping.is_set(), timeout=60, interval=0.5)
        except AssertionError:
            self.errors.append(f"the clock step of {node.name} never showed in its /metrics")

    @contextlib.contextmanager
    def _hold_calls(self) -> Iterator[None]:
        """The held CI calls answer when it ends: into a full disk, on every daemon."""
        assert self.hold_file is not None
        self.hold_file.touch()
        try:
            yield
        finally:
            self.hold_file.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _disk_full(self) -> Iterator[None]:
        count = self.schedule.disk_full_nodes or len(self.nodes)
        with self._lock:  # no kill in between: the witness is alive when the phase starts
            up = [n for n in self.nodes if n.alive() and not n.paused]
            nodes = self.rng.sample(up, min(count, len(up)))
            witness = nodes[0].name
            self.spared.add(witness)
            names = tuple(sorted(n.name for n in nodes))
            window = self.log.open("disk_full", witness=witness, nodes=names)
            for node in nodes:
                node.disk_full_file.touch()
        try:
            yield
        finally:
            for node in nodes:
                node.disk_full_file.unlink(missing_ok=True)
            window.end = time.time()
            self.spared.discard(witness)


def _write_atomically(path: Path, text: str) -> None:
    """The shim reads the file on every clock reading: it must never see it half-written."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text)
    os.replace(staging, path)
