"""Slow clients against a running daemon: bounded threads, bounded connections, whole-request
deadlines, and everyone else still answered (issue 14, item 8).

Before, each connection to the ops endpoint or the webhook receiver had a thread of its own
that read the request itself: 150 slow clients per endpoint cost the daemon 300 threads, the
ops endpoint never gave up on one (no socket timeout) and the receiver's timeout was per read,
so a byte a second held a connection forever. Now one thread receives all requests and a few
workers answer complete ones (``buildq/httpserver.py``).

The slow clients here never finish: on the ops endpoint they trickle one header byte a second;
on the receiver half of them trickle header bytes and half a body they announced.
"""

from __future__ import annotations

import re
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from buildq.migrations import upgrade
from tests.support.daemon import DaemonProcess, write_config
from tests.support.scrape import ops_port
from tests.support.waiting import wait_until

SLOW = 150  # per endpoint

CONFIG = """
[runners.noop]
type = "noop"

[queues.main]
runner = "noop"

# Only for its webhook route: no queue uses it, so nothing calls its API.
[runners.ci]
type = "buildkite"
api_url = "http://127.0.0.1:9"
organization = "acme"
pipeline = "app"
token_env = "BUILDQ_TEST_UNUSED_TOKEN"
webhook_secret_env = "BUILDQ_TEST_WEBHOOK_SECRET"

[webhooks]
enabled = true
port = 0
read_timeout_s = 5
"""

SLOW_HEAD = b"GET /metrics HTTP/1.0\r\nX-Slow: "
SLOW_BODY = b"POST /webhooks/ci HTTP/1.0\r\nContent-Length: 1000\r\n\r\n"


def threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)$", status, re.MULTILINE)
    assert match is not None, status
    return int(match[1])


class SlowClients:
    """Connections that send the start of a request, then one byte a second, forever."""

    def __init__(self, port: int, starts: list[bytes]) -> None:
        self.open: list[socket.socket] = []
        for start in starts:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30)
            sock.sendall(start)
            sock.setblocking(False)
            self.open.append(sock)
        self.closed_by_server = 0

    def trickle(self) -> None:
        """One more byte on every connection the server has not ended (by closing it, or by
        an answer: a 408 or 503 comes with the close)."""
        for sock in list(self.open):
            try:
                sock.recv(1, socket.MSG_PEEK)  # an answer or end of file: ended
            except BlockingIOError:
                try:
                    sock.send(b"a")
                    continue
                except BlockingIOError:
                    continue  # its send buffer is full: the server is not reading it yet
                except OSError:
                    pass
            except OSError:
                pass  # reset
            self._closed(sock)

    def _closed(self, sock: socket.socket) -> None:
        self.open.remove(sock)
        sock.close()
        self.closed_by_server += 1

    def close(self) -> None:
        for sock in self.open:
            sock.close()


class Trickler:
    """Drives the slow clients from one thread, a round a second, and samples the daemon's
    thread count each round."""

    def __init__(self, pid: int, clients: list[SlowClients]) -> None:
        self.pid, self.clients = pid, clients
        self.rounds = 0
        self.peak_threads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trickler", daemon=True)

    def _run(self) -> None:
        while True:
            self.peak_threads = max(self.peak_threads, threads(self.pid))
            for clients in self.clients:
                clients.trickle()
            self.rounds += 1
            if self.stop.wait(1.0):  # the pace of a slow client, not a wait for a condition
                return

    def open(self) -> int:
        return sum(len(c.open) for c in self.clients)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    url = f"sqlite:///{tmp_path / 'buildq.db'}"
    upgrade(url)
    env = {"BUILDQ_TEST_UNUSED_TOKEN": "unused", "BUILDQ_TEST_WEBHOOK_SECRET": "unused"}
    process = DaemonProcess(write_config(tmp_path / "config", url, CONFIG), tmp_path, env)
    yield process
    process.cleanup()


def test_slow_clients_cost_no_threads_and_are_cut_off(daemon: DaemonProcess) -> None:
    daemon.start()
    pid = daemon.process.pid
    ops = ops_port(daemon)
    hooks = int(next(e for e in daemon.events() if e["event"] == "webhooks_listening")["port"])
    baseline = threads(pid)

    slow_ops = SlowClients(ops, [SLOW_HEAD] * SLOW)
    slow_hooks = SlowClients(hooks, [SLOW_HEAD, SLOW_BODY] * (SLOW // 2))
    trickler = Trickler(pid, [slow_ops, slow_hooks])
    trickler.thread.start()
    try:
        wait_until(lambda: trickler.rounds >= 3, timeout=60, message="three trickle rounds")

        # Meanwhile, an ordinary scrape, probe and delivery are answered.
        assert httpx.get(f"http://127.0.0.1:{ops}/healthz", timeout=30).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{ops}/metrics", timeout=30).status_code == 200
        delivery = httpx.post(
            f"http://127.0.0.1:{hooks}/webhooks/nobody", content=b"{}", timeout=30
        )
        assert delivery.status_code == 404  # answered: no runner of that name

        # The daemon's own threads, plus a fixed few for its endpoints: not one per client.
        assert trickler.peak_threads <= baseline + 25, (baseline, trickler.peak_threads)

        # Every slow client is cut off: over the connection cap at once, the rest when its
        # whole-request deadline passes, though it never stops sending.
        wait_until(lambda: trickler.open() == 0, timeout=120, message="slow clients cut off")
        assert slow_ops.closed_by_server == slow_hooks.closed_by_server == SLOW
        assert threads(pid) <= baseline + 25
    finally:
        trickler.stop.set()
        trickler.thread.join(timeout=30)
        slow_ops.close()
        slow_hooks.close()

    assert daemon.stop() == 0
    dropped: dict[str, Counter[str]] = {"ops": Counter(), "webhooks": Counter()}
    for event in daemon.events():
        if event["event"] == "http_connections_dropped":
            dropped[event["server"]].update(
                {k: v for k, v in event.items() if k in ("displaced", "refused", "timed_out")}
            )
    for server, counts in dropped.items():
        # Each slow client was dropped once, by the cap or by its deadline; both happened.
        assert sum(counts.values()) == SLOW, (server, counts)
        assert counts["displaced"] > 0 and counts["timed_out"] > 0, (server, counts)
    assert "Traceback" not in daemon.log_text()
