"""The daemons under chaos: ``buildq run`` processes that are killed, paused and restarted.

A ``Node`` is one daemon slot: every (re)start is a new process with its own log file
(``node<i>-run<j>.log``). Unlike ``tests.e2e.harness.DaemonProcess`` a start does not wait for
readiness, since a daemon restarted during a database outage is not ready until it ends (and
must not crash-loop meanwhile). The ``Lifetime`` of each process (pid, start, end, why it
ended) is what explains a redelivery later: a delivery whose owner was SIGKILLed comes back.
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

from tests.e2e.harness import BUILDQ
from tests.support import read_json_lines


@dataclass
class Lifetime:
    """One process of a node."""

    pid: int
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

    def spawn(self) -> Lifetime:
        log = self.log_dir / f"{self.name}-run{len(self.lifetimes)}.log"
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [BUILDQ, "run", "--config", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        life = Lifetime(self.process.pid, log, time.time())
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
        return self.alive() and any(e.get("event") == "daemon_ready" for e in self.events())

    def ops_port(self) -> int | None:
        for event in self.events():
            if event.get("event") == "ops_http_listening":
                return int(event["port"])
        return None

    def readyz(self) -> int | None:
        """/readyz status code of the current process, None if it does not answer."""
        port = self.ops_port()
        if port is None or not self.alive() or self.paused:
            return None
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code
        except httpx.HTTPError:
            return None


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    yield from read_json_lines(path)
