"""``make local-start``: the daemon, a handful of demo builds, and a live view of them.

Upgrades the config's database, starts ``buildq run`` as a child process (its log in
``var/daemon.log``, so the view stays clean), submits builds on the demo queues of
``config/buildq.toml`` (their sim profiles make each outcome certain: passes, fails, one
cancelled while running, one past its deadline) and shows them until all are finished. The
view then stays up, showing builds submitted from another shell too, until Ctrl-C, which stops
the daemon the way systemd does (SIGTERM, drain, exit 0).

``python -m buildq.demo --config config/buildq.toml [--exit-when-done] [--http-port N]``
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.text import Text

from buildq.buildrunner import BuildStatus
from buildq.builds import Build, Builds, new_request
from buildq.cli.common import CONFIG_ENV, DEFAULT_CONFIG
from buildq.cli.watch import render
from buildq.config import Config, ConfigError, load_config
from buildq.migrations import upgrade
from buildq.queue.contract import QueueError
from buildq.storage.database import redacted_url
from buildq.storage.errors import first_line

_READY_TIMEOUT_S = 30.0
_REFRESH_S = 0.5
# The daemon drains for shutdown_grace_s after SIGTERM; this much more covers the rest of stop.
_STOP_SLACK_S = 15.0
# `buildq run` without relying on the console script being on PATH or beside sys.executable.
_ENTRY_POINT = "import sys; from buildq.cli import main; sys.exit(main())"


@dataclass(frozen=True)
class DemoBuild:
    queue: str
    head: str
    cancel_when_running: bool = False


DEMO_BUILDS = (
    DemoBuild("main", "c101@3f2a9e1"),
    DemoBuild("main", "c102@8b0c4d7"),
    DemoBuild("pass", "c103@51e7aa0"),
    DemoBuild("pass", "c104@0d9f3b2"),
    DemoBuild("fail", "c105@c4e18f6"),
    DemoBuild("slow", "c106@77aa01d"),  # hits the slow queue's finish_by_s
    DemoBuild("slow", "c107@e2b5c39", cancel_when_running=True),
)


class DemoError(Exception):
    """Something the user can act on: printed as one line, exit 1."""


class StopSignals:
    """SIGINT/SIGTERM/SIGHUP ask for a clean stop; a second one hurries it."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.hurry = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        (self.hurry if self.stop.is_set() else self.stop).set()


class DaemonProcess:
    """``buildq run`` as a child in its own session: Ctrl-C reaches only us, and we stop it."""

    def __init__(self, config_path: Path, cwd: Path, port: int, log_path: Path) -> None:
        self.log_path = log_path
        env = {**os.environ, "BUILDQ_HTTP__ENABLED": "true", "BUILDQ_HTTP__PORT": str(port)}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _ENTRY_POINT, "run", "--config", str(config_path)],
                cwd=cwd,  # where the config's relative paths (sim state_dir) are meant to land
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            raise DemoError(f"the daemon exited with status {code}: see {self.log_path}")

    def wait_ready(self, url: str, signals: StopSignals) -> bool:
        """True once /readyz answers 200; False if asked to stop first."""
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(url, timeout=1.0).status_code == 200:
                    return True
            except httpx.TransportError:
                pass  # not listening yet
            if signals.stop.wait(0.1):
                return False
        raise DemoError(
            f"the daemon was not ready after {_READY_TIMEOUT_S:g}s: see {self.log_path}"
        )

    def stop(self, grace_s: float, signals: StopSignals) -> int:
        """SIGTERM, wait for the drain; SIGKILL only past the grace or on a second Ctrl-C."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s + _STOP_SLACK_S
        while self.process.poll() is None and time.monotonic() < deadline:
            if signals.hurry.wait(0.1):
                break
        if self.process.poll() is None:
            self.process.kill()
        return self.process.wait()


def free_port(host: str, wanted: int) -> int:
    """``wanted`` if nothing listens there, else any free port (a second demo, a real daemon)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for port in (wanted, 0) if wanted else (0,):
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise DemoError(f"no free port on {host}")


def submit(builds: Builds, run_id: str, specs: Sequence[DemoBuild]) -> dict[str, DemoBuild]:
    """Submit one request per demo build, as ``buildq submit`` does."""
    submitted = {}
    for n, spec in enumerate(specs, 1):
        request = new_request(
            spec.queue,
            [spec.head],
            ["main@HEAD"],
            metadata={"requested_by": "buildq.demo"},
            request_id=f"demo-{run_id}-{n}",
        )
        builds.submit(request)
        submitted[request.request_id] = spec
    return submitted


class Demo:
    """The submitted builds, the one cancel, and what the view says about them."""

    def __init__(self, api: Builds, submitted: Mapping[str, DemoBuild]) -> None:
        self.api = api
        self.submitted = submitted
        self.to_cancel = {rid for rid, spec in submitted.items() if spec.cancel_when_running}
        self.notes: list[str] = []
        self.builds: dict[str, Build | None] = {}

    def step(self) -> bool:
        """Read every demo build, cancel what is due; True once all are terminal."""
        self.builds = {rid: self.api.get(rid) for rid in self.submitted}
        for rid in sorted(self.to_cancel):
            build = self.builds[rid]
            if build is not None and build.build_id and build.build_status is BuildStatus.RUNNING:
                self.api.cancel(build.build_id)  # what `buildq cancel` does
                self.to_cancel.discard(rid)
                self.notes.append(f"cancellation of {build.build_id} ({rid}) requested")
        return all(b is not None and b.is_terminal for b in self.builds.values())

    def summary(self) -> str:
        finished = [b for b in self.builds.values() if b is not None]
        counts = Counter(b.build_status for b in finished)
        reasons = Counter(
            b.failure_reason or "?" for b in finished if b.build_status is BuildStatus.FAILED
        )
        failed = ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items()))
        return (
            f"all {len(finished)} demo builds finished: {counts[BuildStatus.SUCCEEDED]} "
            f"succeeded, {counts[BuildStatus.FAILED]} failed ({failed or 'none'}), "
            f"{counts[BuildStatus.CANCELLED]} cancelled"
        )


class View:
    """A rich Live view on a terminal; one line per status change otherwise (logs, tests)."""

    def __init__(self, console: Console, header: str) -> None:
        self.console = console
        self.header = header
        self.live: Live | None = None
        self._seen: dict[str, str] = {}
        self._notes_shown = 0
        self._footer_shown = ""

    def __enter__(self) -> View:
        self.console.print(self.header)
        if self.console.is_terminal:
            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        if self.live is not None:
            self.live.stop()

    def update(self, demo: Demo, footer: str = "") -> None:
        if self.live is not None:
            lines = [*demo.notes[-3:], footer]
            self.live.update(Group(render(demo.api.store), Text("\n".join(x for x in lines if x))))
            return
        for rid, build in demo.builds.items():
            if build is not None and self._seen.get(rid) != build.status:
                self._seen[rid] = build.status
                reason = f" ({build.failure_reason})" if build.failure_reason else ""
                self.console.print(f"{rid} {build.queue} {build.status}{reason}")
        for note in demo.notes[self._notes_shown :]:
            self.console.print(note)
        self._notes_shown = len(demo.notes)
        if footer and footer != self._footer_shown:
            self._footer_shown = footer
            self.console.print(footer)


# --- the command ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    console = Console(highlight=False, soft_wrap=True)
    signals = StopSignals()  # before anything slow, so an early Ctrl-C is clean too
    try:
        config = load_config(args.config)
        return _run(config, args, console, signals)
    except ConfigError as err:
        print(f"buildq.demo: {err}", file=sys.stderr)
        return 2
    except (DemoError, QueueError) as err:
        print(f"buildq.demo: {err}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m buildq.demo", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG),
        help=f"config file (default: ${CONFIG_ENV} or {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--http-port",
        type=int,
        default=0,
        help="daemon's ops port (default: the config's, if free)",
    )
    parser.add_argument(
        "--exit-when-done", action="store_true", help="stop once every demo build has finished"
    )
    return parser


def _run(config: Config, args: argparse.Namespace, console: Console, signals: StopSignals) -> int:
    assert config.path is not None  # load_config was given a path
    missing = sorted({b.queue for b in DEMO_BUILDS} - set(config.queues))
    if missing:
        raise DemoError(
            f"{config.path} has no [queues.{missing[0]}]: the demo needs the demo queues of "
            "config/buildq.toml"
        )
    root = config.path.parent.parent  # where load_config resolves relative SQLite paths
    url = config.database.connect_url()
    try:
        upgrade(url)
    except Exception as err:  # alembic and drivers raise many types; the user needs one line
        raise DemoError(f"upgrade of {redacted_url(url)} failed: {first_line(err)}") from None
    if signals.stop.is_set():
        return 0
    port = args.http_port or free_port(config.http.bind, config.http.port)
    daemon = DaemonProcess(config.path, root, port, root / "var" / "daemon.log")
    console.print(
        f"database {redacted_url(config.database.url)} upgraded; daemon started "
        f"(pid {daemon.pid}, port {port}, log {daemon.log_path})"
    )
    try:
        _show(
            daemon,
            url,
            f"http://{_loopback(config.http.bind)}:{port}/readyz",
            args,
            console,
            signals,
        )
    finally:
        if signals.stop.is_set():
            console.print("stopping the daemon (Ctrl-C again to kill it)")
        code = daemon.stop(config.daemon.shutdown_grace_s, signals)
    if code != 0:
        raise DemoError(f"the daemon exited with status {code}: see {daemon.log_path}")
    console.print("daemon stopped cleanly")
    return 0


def _show(
    daemon: DaemonProcess,
    url: str,
    readyz: str,
    args: argparse.Namespace,
    console: Console,
    signals: StopSignals,
) -> None:
    if not daemon.wait_ready(readyz, signals):
        return
    with Builds.open(url, retry_for_s=10) as builds:
        demo = Demo(builds, submit(builds, secrets.token_hex(3), DEMO_BUILDS))
        header = f"daemon ready; {len(demo.submitted)} demo builds submitted"
        footer, done = "", False
        with View(console, header) as view:
            while True:
                daemon.check_alive()
                if not done and demo.step():
                    done = True
                    footer = demo.summary() + ("" if args.exit_when_done else "; Ctrl-C to stop")
                view.update(demo, footer)
                if (done and args.exit_when_done) or signals.stop.wait(_REFRESH_S):
                    return


def _loopback(bind: str) -> str:
    """Where to reach a server bound to ``bind`` from this host, as a URL's host part."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(bind, bind)
    return f"[{host}]" if ":" in host else host


if __name__ == "__main__":
    sys.exit(main())
