"""Run the daemon as a real process against a test database, and read what it did."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from buildq.buildrunner import Change
from buildq.orchestrator import topics
from buildq.orchestrator.model import BuildRequest
from buildq.queue.contract import Message, message_id
from buildq.queue.sql import SqlQueue
from buildq.storage.database import Database, create_engine
from tests.support.waiting import read_json_lines, wait_until

BUILDQ = str(Path(sys.executable).parent / "buildq")

FAST_CONSUMER = """
[consumer.defaults]
slots = 16
lease_duration_ms = 2000
renew_interval_ms = 300
heartbeat_stale_ms = 2000
visibility_timeout_ms = 3000
max_attempts = 3
backoff_initial_ms = 200
backoff_multiplier = 2.0
backoff_cap_ms = 2000
backoff_jitter = 0.0
poll_interval_ms = 50
batch_size = 32
"""


def noop_queue(queue: str) -> str:
    """Runners and queues for ``write_config``: a noop runner behind ``queue``, polled every
    50 ms, so a build is done on its first poll."""
    return f"""
[runners.noop]
type = "noop"

[queues.{queue}]
runner = "noop"

[queues.{queue}.poll]
accepted_interval_s = 0.05
"""


def write_config(directory: Path, url: str, body: str) -> Path:
    """A config for the daemon under test: ``body`` holds runners and queues."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "buildq.toml"
    path.write_text(
        f'[database]\nurl = "{url}"\n\n[daemon]\nshutdown_grace_s = 10\nlog_format = "json"\n'
        f'log_level = "debug"\n\n[http]\nport = 0\n{FAST_CONSUMER}\n{textwrap.dedent(body)}'
    )
    path.chmod(0o600)
    return path


@dataclass
class DaemonProcess:
    config: Path
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    runs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> DaemonProcess:
        index = len(self.runs)
        # The child writes through its own copy of the descriptor: ours can close at once.
        with open(self.log_dir / f"daemon-{index}.log", "wb") as log:
            process = subprocess.Popen(
                [BUILDQ, "run", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **self.env},
            )
        self.runs.append(process)
        wait_until(
            lambda: self.ready() or process.poll() is not None, timeout=30, message="daemon ready"
        )
        assert process.poll() is None, self.log_text()
        return self

    @property
    def process(self) -> subprocess.Popen[bytes]:
        return self.runs[-1]

    def ready(self) -> bool:
        return any(e.get("event") == "daemon_ready" for e in self.events(len(self.runs) - 1))

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 30) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def cleanup(self) -> None:
        for process in self.runs:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)

    def events(self, run: int | None = None) -> list[dict[str, Any]]:
        indexes = range(len(self.runs)) if run is None else [run]
        out = []
        for index in indexes:
            out += read_json_lines(self.log_dir / f"daemon-{index}.log")
        return out

    def log_text(self) -> str:
        return "\n".join(
            (self.log_dir / f"daemon-{i}.log").read_text(errors="replace")[-5000:]
            for i in range(len(self.runs))
        )


#: The ``daemon`` fixture: ``daemon(body, env=None, url=None)`` makes a DaemonProcess.
MakeDaemon = Callable[..., DaemonProcess]


class World:
    """The test's view of the database the daemon works on."""

    def __init__(self, url: str) -> None:
        self.db = Database(create_engine(url, pool_size=4))
        self.queue = SqlQueue(self.db)

    def close(self) -> None:
        self.db.dispose()

    def submit(self, queue: str, n: int, prefix: str = "req") -> list[str]:
        ids = [f"{prefix}-{i}" for i in range(n)]
        self.queue.publish_many(
            topics.BUILD,
            [
                Message(
                    id=message_id(rid, "request"),
                    payload=BuildRequest(
                        rid, queue, (Change("base-1", "b1"),), (Change(f"c-{rid}", "r1"),)
                    ).to_bytes(),
                    partition_key=rid,
                )
                for rid in ids
            ],
        )
        return ids

    def rows(self, sql: str, **params: Any) -> list[Any]:
        return self.db.read(lambda c: list(c.execute(sa.text(sql), params).all()))

    def builds(self) -> list[Any]:
        return self.rows("SELECT * FROM builds ORDER BY request_id")

    def all_terminal(self, expected: int) -> bool:
        rows = self.builds()
        return len(rows) == expected and all(
            r.status in ("SUCCEEDED", "FAILED", "CANCELLED") for r in rows
        )

    def live_polls(self) -> list[Any]:
        """Per triggered build, in one consistent read: its status and its live poll messages."""
        return self.rows(
            "SELECT b.build_id, b.status, (SELECT COUNT(*) FROM queue_deliveries d"
            " JOIN queue_messages m ON m.seq = d.seq"
            " WHERE d.topic = 'buildsignal' AND m.topic = 'buildsignal' AND m.partition_key = b.build_id"
            ") AS live FROM builds b WHERE b.build_id IS NOT NULL"
        )

    def check_one_live_poll(self) -> None:
        for row in self.live_polls():
            terminal = row.status in ("SUCCEEDED", "FAILED", "CANCELLED")
            assert row.live == (0 if terminal else 1), row

    def poll_numbers(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for row in self.rows(
            "SELECT partition_key, message_id FROM queue_messages WHERE topic = 'buildsignal'"
        ):
            out.setdefault(row.partition_key, []).append(int(row.message_id.rsplit("/", 1)[1]))
        return {k: sorted(v) for k, v in out.items()}

    def results_per_request(self) -> dict[str, int]:
        rows = self.rows(
            "SELECT partition_key, COUNT(*) AS n FROM queue_messages WHERE topic = 'buildresult' GROUP BY partition_key"
        )
        return {r.partition_key: int(r.n) for r in rows}

    def dead_letters(self, topic: str) -> list[Any]:
        return self.rows("SELECT * FROM queue_messages WHERE topic = :t", t=topic)
