"""A real Buildbot master and worker from PyPI, on 127.0.0.1, for the end-to-end tests.

Buildbot brings its own Twisted and SQLAlchemy, so it lives in a virtualenv of its own, made
once and cached (``$BUILDQ_TEST_CACHE``, default ``~/.cache/buildq-tests``; a lock keeps
concurrent sessions from building it twice); master and worker run from there as processes.
Each session gets a throwaway base directory with one builder, ``buildq``, whose shell step
reads the build's head changes: ``c-fail…`` exits 1, ``c-hang…`` runs until cancelled,
``c-hold…`` runs until the test creates ``release/<request id>``, anything else exits 0.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.waiting import wait_until

VERSION = "4.3.0"
WORKERS = ("w1", "w2")
PACKAGES = (f"buildbot=={VERSION}", f"buildbot-worker=={VERSION}", f"buildbot-www=={VERSION}")

MASTER_CFG = """\
from buildbot.plugins import schedulers, steps, util, worker

PROPERTIES = ("buildq_request_id", "buildq_queue", "buildq_base", "buildq_head")
SCRIPT = r'''
case "$BUILDQ_HEAD" in
  *'"id":"c-fail'*) echo failing; exit 1 ;;
  *'"id":"c-hang'*) exec sleep 600 ;;
  *'"id":"c-hold'*) while [ ! -e "$RELEASE/$BUILDQ_REQUEST_ID" ]; do sleep 0.1; done ;;
esac
echo "built $BUILDQ_REQUEST_ID"
'''

factory = util.BuildFactory()
factory.addStep(steps.ShellCommand(
    name="build", command=["sh", "-c", SCRIPT],
    env={{"BUILDQ_HEAD": util.Property("buildq_head"),
          "BUILDQ_REQUEST_ID": util.Property("buildq_request_id"),
          "RELEASE": {release!r}}},
))

BuildmasterConfig = {{
    "title": "buildq tests",
    "buildbotURL": "http://127.0.0.1:{www_port}/",
    "buildbotNetUsageData": None,
    "db": {{"db_url": "sqlite:///state.sqlite"}},
    "protocols": {{"pb": {{"port": "tcp:{pb_port}:interface=127.0.0.1"}}}},
    "www": {{"port": "tcp:{www_port}:interface=127.0.0.1", "plugins": {{}}}},
    # Buildbot runs one build per builder and worker at a time: two builds in parallel.
    "workers": [worker.Worker(name, "pw") for name in {workers!r}],
    "schedulers": [schedulers.ForceScheduler(
        name="buildq", builderNames=["buildq"],
        properties=[util.StringParameter(name=n, default="") for n in PROPERTIES],
    )],
    # Every forced request has the same (empty) source stamp: never merge two of them.
    "builders": [util.BuilderConfig(
        name="buildq", workernames={workers!r}, factory=factory, collapseRequests=False,
    )],
}}
"""


def cache_dir() -> Path:
    return Path(os.environ.get("BUILDQ_TEST_CACHE") or Path.home() / ".cache" / "buildq-tests")


def buildbot_venv() -> Path:
    """The cached virtualenv with Buildbot in it, made if missing (about half a minute)."""
    root = cache_dir()
    venv = root / f"buildbot-{VERSION}-py{sys.version_info.major}{sys.version_info.minor}"
    if (venv / ".complete").exists():
        return venv
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".buildbot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (venv / ".complete").exists():
            # Built in place (a venv's scripts name its interpreter by path); a half-built one
            # from an interrupted run is started over.
            shutil.rmtree(venv, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
            subprocess.run([*pip, *PACKAGES], check=True, timeout=600)
            (venv / ".complete").touch()
    return venv


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BuildbotMaster:
    """A master and one worker in ``base``; ``url`` is the master's web root."""

    venv: Path
    base: Path
    www_port: int = field(default_factory=free_port)
    pb_port: int = field(default_factory=free_port)
    master: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.www_port}"

    @property
    def release_dir(self) -> Path:
        return self.base / "release"

    def create(self) -> BuildbotMaster:
        bin_dir = self.venv / "bin"
        self.release_dir.mkdir(parents=True)
        (self.base / "master").mkdir()
        (self.base / "master" / "master.cfg").write_text(
            MASTER_CFG.format(
                www_port=self.www_port,
                pb_port=self.pb_port,
                release=str(self.release_dir),
                workers=list(WORKERS),
            )
        )
        commands = [[bin_dir / "buildbot", "create-master", "-r", self.base / "master"]]
        for name in WORKERS:
            worker = [self.base / name, f"127.0.0.1:{self.pb_port}", name, "pw"]
            # --maxdelay: a worker retries a lost master every 2 s at most, not minutes.
            commands.append(
                [bin_dir / "buildbot-worker", "create-worker", "-r", "--maxdelay", "2", *worker]
            )
        for command in commands:
            subprocess.run(command, stdout=subprocess.DEVNULL, check=True, timeout=120)
        return self

    def start(self) -> None:
        """Start the master (and the workers, once), and wait until every worker is attached."""
        self.master = self._spawn("buildbot", self.base / "master", "master")
        if not self.workers:
            self.workers = [
                self._spawn("buildbot-worker", self.base / name, name) for name in WORKERS
            ]
        wait_until(self.workers_attached, timeout=90, interval=0.2, message="workers attached")

    def kill_master(self) -> None:
        """The master dies at once (SIGKILL); its workers stay and reconnect later.

        Not SIGTERM: Buildbot 4.3's clean shutdown stops running builds with RETRY, but
        ``Build.stopBuild`` interrupts the step before it sets that result, so a step that ends
        promptly on interrupt finishes the build as CANCELLED, and its request with it. After
        a crash, the restarted master marks the dead run's builds RETRY and requeues their
        requests, every time.
        """
        if self.master is not None and self.master.poll() is None:
            self.master.kill()
            self.master.wait(timeout=60)

    def stop(self) -> None:
        for process in (*self.workers, self.master):
            if process is not None and process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)  # the worker's builds too
                process.wait(timeout=30)

    def workers_attached(self) -> bool:
        for process, what in ((self.master, "master"), *zip(self.workers, WORKERS, strict=True)):
            if process is not None and process.poll() is not None:
                raise AssertionError(f"buildbot {what} exited: {self.log_tail(what)}")
        try:
            workers = httpx.get(f"{self.url}/api/v2/workers", timeout=5).json()["workers"]
        except (httpx.HTTPError, ValueError, KeyError):
            return False
        return sum(1 for w in workers if w.get("connected_to")) == len(WORKERS)

    def get(self, path: str) -> object:
        return httpx.get(f"{self.url}/api/v2{path}", timeout=10).json()

    def log_tail(self, what: str) -> str:
        path = self.base / what / "twistd.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def _spawn(self, command: str, directory: Path, what: str) -> subprocess.Popen[bytes]:
        # The child keeps its own copy of the descriptor; ours is closed once it has started.
        with open(self.base / f"{what}.out", "ab") as log:
            return subprocess.Popen(
                [self.venv / "bin" / command, "start", "--nodaemon", directory],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() takes the builds too
            )
