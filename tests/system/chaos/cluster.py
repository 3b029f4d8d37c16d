"""The daemons under chaos: ``buildq run`` processes that are killed, paused and restarted.

A ``Node`` is one daemon slot: every (re)start is a new process with its own log file
(``node<i>-run<j>.log``). Unlike ``tests.support.daemon.DaemonProcess`` a start does not wait for
readiness, since a daemon restarted during a database outage is not ready until it ends (and
must not crash-loop meanwhile). The ``Lifetime`` of each process (pid, start, end, why it
ended) is what explains a redelivery later: a delivery whose owner was SIGKILLed comes back.

Every process runs with the host-fault shims of tests/support/shims, off until the harness writes a
node's files: ``clock_step_file`` (seconds its wall clock is ahead) and ``disk_full_file``
(while it exists, the process's writes fail as on a full database disk). The files outlive a
restart, as a host's clock and disk do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import shims
from tests.support.daemon import BUILDQ
from tests.support.scrape import scrape
from tests.support.waiting import read_json_lines


@dataclass
class Lifetime:
    """One process of a node."""

    pid: int
    node: str
    log: Path
    started: float  # epoch s
    ended: float | None = None
    #: "killed" (SIGKILL by the harness), "stopped" (SIGTERM by the harness), "exited" (itself)
    end: str = ""
    exit_code: int | None = None
    #: [paused, resumed] epoch s intervals (SIGSTOP / SIGCONT)
    pauses: list[list[float]] = field(default_factory=list)


@dataclass
class Node:
    name: str
    config: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    lifetimes: list[Lifetime] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    paused: bool = False
    #: What the current process's log already said (pid -> port; pids that were ready): the
    #: log grows to megabytes, and /readyz is probed twice a second.
    _ports: dict[int, int] = field(default_factory=dict, repr=False)
    _ready: set[int] = field(default_factory=set, repr=False)

    @property
    def clock_step_file(self) -> Path:
        return self.log_dir / f"{self.name}.clock-step"

    @property
    def disk_full_file(self) -> Path:
        return self.log_dir / f"{self.name}.disk-full"

    def spawn(self) -> Lifetime:
        log = self.log_dir / f"{self.name}-run{len(self.lifetimes)}.log"
        faults = shims.env(
            clock_step_file=self.clock_step_file,
            # The sim runners play the CI services, on hosts of their own: a step of this
            # host's clock must not make their builds look two hours older or younger.
            clock_step_exempt=(shims.SIM_RUNNER,),
            disk_full_file=self.disk_full_file,
        )
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [BUILDQ, "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **faults, **self.env},
            )
        life = Lifetime(self.process.pid, self.name, log, time.time())
        self.lifetimes.append(life)
        return life

    @property
    def current(self) -> Lifetime:
        return self.lifetimes[-1]

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        if self.paused:
            self.resume()
        self.process.kill()
        self.process.wait(timeout=10)
        self._ended("killed")

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True
        self.current.pauses.append([time.time(), 0.0])

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)
        self.paused = False
        self.current.pauses[-1][1] = time.time()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM: drain and leave; the exit code."""
        assert self.process is not None
        if self.paused:
            self.resume()
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=timeout)
        self._ended("stopped")
        return code

    def reap(self) -> None:
        """Notice a process that ended by itself (a crash: the harness never lets one go)."""
        if self.process is not None and self.process.poll() is not None and not self.current.end:
            self._ended("exited")

    def _ended(self, how: str) -> None:
        assert self.process is not None
        life = self.current
        life.ended, life.end, life.exit_code = time.time(), how, self.process.returncode

    def cleanup(self) -> None:
        if self.process is not None and self.process.poll() is None:
            if self.paused:
                self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)

    # --- what the current process said --------------------------------------------------------

    def events(self, life: Lifetime | None = None) -> Iterator[dict[str, Any]]:
        yield from read_events((life or self.current).log)

    def ready(self) -> bool:
        if not self.alive():
            return False
        pid = self.current.pid
        if pid not in self._ready and any(e.get("event") == "daemon_ready" for e in self.events()):
            self._ready.add(pid)
        return pid in self._ready

    def ops_port(self) -> int | None:
        pid = self.current.pid
        if pid not in self._ports:
            for event in self.events():
                if event.get("event") == "ops_http_listening":
                    self._ports[pid] = int(event["port"])
                    break
        return self._ports.get(pid)

    def readyz(self) -> int | None:
        """/readyz status code of the current process, None if it does not answer."""
        return self.readyz_answer()[0]

    def readyz_answer(self) -> tuple[int | None, str]:
        """/readyz status code and text of the current process; None if it does not answer."""
        port = self.ops_port()
        if port is None or not self.alive() or self.paused:
            return None, ""
        try:
            answer = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5)
        except httpx.HTTPError:
            return None, ""
        return answer.status_code, answer.text.strip()

    def metric(self, name: str) -> float | None:
        """A metric of the current process (the sum of its series), None if it does not
        answer."""
        port = self.ops_port()
        if port is None or not self.alive() or self.paused:
            return None
        try:
            return scrape(port).value(name)
        except (httpx.HTTPError, AssertionError):  # AssertionError: not a 200
            return None


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    yield from read_json_lines(path)
