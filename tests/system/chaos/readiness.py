"""What the daemons' /readyz said during the run, and whether it told the truth.

Every daemon is probed twice a second. While the database is unreachable every daemon must be
red; while a daemon's writes are refused (a full disk) it must be red and say why, as an
operator paging through /readyz would need; at the end every daemon must be green.

A daemon restarted while its writes are refused waits to join its consumer groups; until it
has, /readyz must say "starting", never 200 (``readyz_green_starting`` counts such answers, and
any fails the run).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from dataclasses import dataclass, field

from tests.support.waiting import wait_until
from tests.system.chaos.audit import Verdict
from tests.system.chaos.cluster import Node
from tests.system.chaos.faults import FaultLog, Window

#: How long a daemon may take to notice a fault and turn red (its database probe runs every
#: 2 s; a refused lease renewal shows within one renewal interval), on a loaded machine.
NOTICE_S = 3.0
#: How soon a daemon whose writes were refused is ready again once they are not: its lease
#: renewal succeeds within an interval, a hand-off within its back-off (5 s at most).
RECOVER_S = 20.0
#: How a full disk reads in a /readyz answer: MariaDB's error 1021, or SQLite's message.
DISK_FULL = re.compile(r"Disk full|1021|disk is full")


@dataclass(frozen=True)
class Probe:
    at: float  # epoch s, when the probe was sent
    node: str
    code: int | None  # None: no answer (down, paused, starting)
    text: str
    #: The process had not logged ``daemon_ready`` when it answered (it was starting).
    starting: bool


@dataclass
class Readiness:
    probes: list[Probe] = field(default_factory=list)
    #: Red answers seen during database outages, and during full disks.
    red_in_outage: int = 0
    red_disk_full: int = 0
    #: Green answers of daemons still starting while their writes were refused (none is right).
    green_starting: int = 0

    def watch(self, nodes: list[Node], stop: threading.Event) -> None:
        """Probe every node until ``stop`` (on a thread of its own)."""
        while not stop.wait(0.5):
            for node in nodes:
                at = time.time()
                code, text = node.readyz_answer()
                # Read after the answer: not ready then means not ready when it answered.
                starting = code is not None and not node.ready()
                self.probes.append(
                    Probe(at, node.name, code, text if code != 200 else "", starting)
                )

    def check(self, nodes: list[Node], faults: FaultLog, verdict: Verdict) -> None:
        """Red during outages and full disks (with the reason), green at the end."""
        for window in faults.of("db_outage"):
            during = [p.code for p in self._during(window)]
            self.red_in_outage += during.count(503)
            if 503 not in during:
                verdict.readiness.append(f"/readyz never red during the outage ({set(during)})")
            if 200 in during:
                verdict.readiness.append("/readyz green while the database was unreachable")
        for window in faults.of("disk_full"):
            self._check_disk_full(window, verdict)
        with contextlib.suppress(AssertionError):  # one restarted by the last kill may be starting
            wait_until(lambda: all(n.ready() for n in nodes), timeout=60, interval=0.2)
        for node in nodes:
            if not node.ready():
                verdict.readiness.append(f"{node.name} not ready at the end")
            elif node.readyz() != 200:
                verdict.readiness.append(f"{node.name} /readyz is {node.readyz()} at the end")

    def _check_disk_full(self, window: Window, verdict: Verdict) -> None:
        during = [p for p in self._during(window) if p.node in window.nodes]
        self.green_starting += sum(1 for p in during if p.code == 200 and p.starting)
        green = sorted({p.node for p in during if p.code == 200})
        if green:
            verdict.readiness.append(f"/readyz green while writes were refused: {green}")
        told = [p for p in during if p.code == 503 and DISK_FULL.search(p.text)]
        self.red_disk_full += len(told)
        # A daemon restarted during the phase cannot join its groups until it ends: the
        # witness, which no kill hit, must have said why; every daemon that was up must have.
        for name in window.nodes:
            answered = [p for p in during if p.node == name and p.code == 503 and not p.starting]
            if (answered or name == window.witness) and not any(p.node == name for p in told):
                last = answered[-1].text if answered else "no red answer"
                verdict.readiness.append(
                    f"{name} /readyz did not say its writes were refused: {last!r}"
                )
        # And green again soon after: the witness has nothing left to wait for.
        after = [
            p
            for p in self.probes
            if p.node == window.witness and window.end < p.at <= window.end + RECOVER_S
        ]
        if not any(p.code == 200 for p in after):
            verdict.readiness.append(
                f"{window.witness} /readyz not green within {RECOVER_S:g}s of the disk's"
                f" space coming back: {sorted({(p.code, p.text) for p in after})[:3]}"
            )

    def _during(self, window: Window) -> list[Probe]:
        # The last probe sent before the fault ended may be answered after it.
        return [p for p in self.probes if window.start + NOTICE_S <= p.at <= window.end - 0.5]
