"""Secrets: canaries that must appear nowhere, and config files that may not hold them.

A full run with a canary database password (a MariaDB user created for the test), a canary CI
token and a canary webhook secret, all from the environment: builds pass, fail, are cancelled
and refused, a status read fails, webhooks arrive signed and forged, the CLI shows everything
as JSON, a daemon waits for a database it cannot reach, a CLI uses a wrong password. Then
every byte the run produced — logs, CLI output, /metrics, /healthz, /readyz, webhook answers,
the stored builds and messages — is searched for the canaries.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from buildq.cli import main
from buildq.orchestrator import topics
from tests.support.daemon import BUILDQ, DaemonProcess, MakeDaemon, World, write_config
from tests.support.waiting import wait_until
from tests.system.e2e.ci_support import (
    RUNNER,
    FakeCI,
    Receiver,
    all_stored_text,
    canary,
    start_ci,
)

DB_PASSWORD_ENV = "BUILDQ_CANARY_DB_PASSWORD"

QUEUE = f"""
[webhooks]
enabled = true
port = 0

[queues.main]
runner = "{RUNNER}"

[queues.main.poll]
accepted_interval_s = 0.2
running_interval_s = 0.2
growth = 1.0
max_interval_s = 0.2
jitter = 0.0
webhook_safety_interval_s = 0.5
"""


@dataclass
class Target:
    """Where the run's database is, and how the daemon and the CLI log in."""

    url: str  # without the password
    env: dict[str, str]
    password: str | None
    world: World


@pytest.fixture
def target(backend_url: str) -> Iterator[Target]:
    """On MariaDB a user with a canary password; on SQLite there is no database password."""
    world = World(backend_url)
    if backend_url.startswith("sqlite"):
        yield Target(backend_url, {}, None, world)
        world.close()
        return
    password = canary("dbpassword") + "-p@ss/w:rd%"
    user = f"bq_canary_{secrets.token_hex(4)}"
    server = sa.make_url(backend_url)
    admin = sa.create_engine(server)
    with admin.begin() as conn:
        for host in ("%", "localhost"):
            who = {"u": user, "h": host}
            conn.execute(
                sa.text("CREATE USER IF NOT EXISTS :u@:h IDENTIFIED BY :pw"), who | {"pw": password}
            )
            conn.execute(sa.text(f"GRANT ALL PRIVILEGES ON `{server.database}`.* TO :u@:h"), who)
    url = server.set(username=user, password=None).render_as_string(hide_password=False)
    try:
        yield Target(url, {DB_PASSWORD_ENV: password}, password, world)
    finally:
        world.close()
        with admin.begin() as conn:
            for host in ("%", "localhost"):
                conn.execute(sa.text("DROP USER IF EXISTS :u@:h"), {"u": user, "h": host})
        admin.dispose()


@pytest.fixture
def ci() -> Iterator[FakeCI]:
    fake = start_ci("buildkite")
    yield fake
    fake.stop()


@dataclass
class Produced:
    """Everything the run wrote or answered, by where it came from."""

    texts: dict[str, str] = field(default_factory=dict)

    def add(self, where: str, text: str | bytes) -> None:
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        self.texts[where] = self.texts.get(where, "") + text

    def cli(self, config: Path, env: dict[str, str], *args: str, ok: bool = True) -> str:
        done = subprocess.run(
            [BUILDQ, *args, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **env},
        )
        self.add(f"buildq {' '.join(args)}", done.stdout + done.stderr)
        if ok:
            assert done.returncode == 0, done.stderr
        return done.stdout


def make_daemon(tmp: Path, name: str, url: str, body: str, env: dict[str, str]) -> DaemonProcess:
    config = write_config(tmp / name / "config", url, body)
    if DB_PASSWORD_ENV in env:
        text = config.read_text().replace(
            "[daemon]", f'password_env = "{DB_PASSWORD_ENV}"\n\n[daemon]', 1
        )
        config.write_text(text)
    return DaemonProcess(config, tmp / name, env)


def test_canary_secrets_appear_nowhere(target: Target, ci: FakeCI, tmp_path: Path) -> None:
    env = {**target.env, **ci.env()}
    canaries = [ci.token, ci.secret] + ([target.password] if target.password else [])
    out = Produced()
    daemon = make_daemon(tmp_path, "d0", target.url, ci.runner_toml(webhooks=True) + QUEUE, env)
    try:
        daemon.start()
        run_builds(daemon, ci, target, env, out)
        show_everything(daemon, target, env, out)
        failing_logins(daemon, tmp_path, target, ci, env, out)
        assert daemon.stop() == 0
    finally:
        daemon.cleanup()
    out.add("daemon logs", "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*.log")))
    out.add("database", all_stored_text(target.world))
    assert len(out.texts) > 15 and all(out.texts.values())
    for secret in canaries:
        # The unique hex part too: it would survive any quoting or URL-encoding of the value.
        unique = re.search(r"[0-9a-f]{16}", secret)
        assert unique is not None
        for needle in (secret, unique.group()):
            leaks = [where for where, text in out.texts.items() if needle in text]
            assert not leaks, f"canary {needle[:20]}… found in {leaks}"


def run_builds(
    daemon: DaemonProcess, ci: FakeCI, target: Target, env: dict[str, str], out: Produced
) -> None:
    """Pass, fail, cancel, a refused create, a failing status read, signed and forged hooks."""
    config = daemon.config
    ci.fail_next_status(f"upstream error for credential {ci.token}")
    ids = {}
    for name in ("passes", "fails", "cancels"):
        out.cli(config, env, "submit", "--queue", "main", "--head", f"c-{name}",
                "--request-id", name, "--json")  # fmt: skip
    wait_until(lambda: len(ci.build_ids()) == 3, timeout=30, message="3 builds triggered")
    ids = ci.build_ids()
    ci.refuse_next_create(f"token {ci.token} may not create builds")
    out.cli(config, env, "submit", "--queue", "main", "--head", "c", "--request-id", "refused")
    receiver = Receiver.of(daemon)
    for name in ("passes", "fails", "cancels"):
        ci.set_running(ids[name])
    ci.finish(ids["passes"], passed=True)
    ci.finish(ids["fails"], passed=False)
    for delivery in (
        ci.signed_delivery(ids["passes"]),
        ci.forged_delivery(ids["fails"]),
        ci.signed_delivery(ids["fails"], stale=True),
        ci.oversize_delivery(ids["fails"], 2_000_000),
    ):
        try:
            answer = receiver.post(delivery)
            out.add("webhook answers", f"{answer.status_code} {answer.text}\n")
        except httpx.HTTPError as err:  # the oversize body may be cut off: that is an answer
            out.add("webhook answers", f"{type(err).__name__}: {err}\n")
    out.cli(config, env, "cancel", ids["cancels"])
    wait_until(lambda: target.world.all_terminal(4), timeout=60, message="4 builds terminal")
    outcomes = {r.request_id: (r.status, r.failure_reason) for r in target.world.builds()}
    assert outcomes == {
        "passes": ("SUCCEEDED", None),
        "fails": ("FAILED", "verdict"),
        "cancels": ("CANCELLED", "cancelled"),
        "refused": ("FAILED", "infra"),
    }


def show_everything(
    daemon: DaemonProcess, target: Target, env: dict[str, str], out: Produced
) -> None:
    config = daemon.config
    for args in (
        ("builds", "ls", "--json"),
        ("builds", "show", "refused", "--json"),
        ("builds", "show", "passes"),
        ("watch", "--once"),
        ("queue", "topics", "--json"),
        ("queue", "stats", "--topic", topics.BUILDSIGNAL, "--json"),
        ("queue", "messages", "--topic", topics.BUILD, "--json"),
        ("queue", "messages", "--topic", topics.BUILDRESULT, "--json"),
        ("queue", "inspect", "--topic", topics.BUILD, "--id", "refused/request", "--json"),
        ("queue", "leases", "--json"),
        ("dlq", "ls", "--topic", topics.BUILD, "--json"),
        ("doctor", "--json"),
    ):
        out.cli(config, env, *args, ok=args[0] != "doctor")
    port = next(e["port"] for e in daemon.events() if e.get("event") == "ops_http_listening")
    for path in ("/metrics", "/healthz", "/readyz", "/nope"):
        answer = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10)
        out.add(f"http {path}", f"{answer.status_code}\n{answer.headers}\n{answer.text}")
    assert "buildq_" in out.texts["http /metrics"]


def failing_logins(
    daemon: DaemonProcess, tmp: Path, target: Target, ci: FakeCI, env: dict[str, str], out: Produced
) -> None:
    """Errors are where secrets leak: a wrong password, an unreachable server, a typo'd key."""
    if target.password is not None:
        wrong = {**env, DB_PASSWORD_ENV: target.password[::-1]}
        out.cli(daemon.config, wrong, "builds", "ls", ok=False)
        out.cli(daemon.config, wrong, "doctor", ok=False)
        # A daemon whose server is not there: it waits (readyz red), logging why, and stops.
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            closed_port = sock.getsockname()[1]
        url = sa.make_url(target.url).set(port=closed_port).render_as_string(hide_password=False)
        waiting = make_daemon(tmp, "unreachable", url, ci.runner_toml(webhooks=True) + QUEUE, env)
        with open(tmp / "unreachable" / "daemon-0.log", "wb") as log:
            process = subprocess.Popen(
                [BUILDQ, "run", "--config", str(waiting.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
            )
        wait_until(
            lambda: "database_unavailable" in (tmp / "unreachable" / "daemon-0.log").read_text(),
            timeout=30,
        )
        process.terminate()
        assert process.wait(timeout=30) == 0
    # The secrets pasted where their variables' names belong, and under a misspelt key.
    typo = tmp / "typo.toml"
    typo.write_text(
        f'[database]\nurl = "{target.url}"\npasword = "{target.password or ci.secret}"\n\n'
        f'[runners.ci]\ntype = "buildkite"\norganization = "o"\npipeline = "p"\n'
        f'token_env = "{ci.token}"\n'
    )
    typo.chmod(0o600)
    for args in (("run",), ("builds", "ls")):
        done = subprocess.run(
            [BUILDQ, *args, "--config", str(typo)], capture_output=True, text=True, timeout=30
        )
        out.add(f"typo {args}", done.stdout + done.stderr)
        assert done.returncode == 2 and "Traceback" not in done.stderr
    pasted = tmp / "pasted.toml"
    pasted.write_text(typo.read_text().replace("pasword", "password_env"))
    pasted.chmod(0o600)
    done = subprocess.run(
        [BUILDQ, "run", "--config", str(pasted)], capture_output=True, text=True, timeout=30
    )
    out.add("pasted secret", done.stdout + done.stderr)
    assert done.returncode == 2 and "not a variable name" in done.stderr


# --- config files that hold secrets must be private -----------------------------------


def refused(config: Path, *args: str) -> str:
    """``buildq ARGS --config CONFIG`` in-process: the one error line it printed."""
    err = io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:  # `run` installs its signal handlers before it wires the runners
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main([*args, "--config", str(config)])
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert code == 2, err.getvalue()
    return err.getvalue()


SECRET = "canary-inline-0123456789abcdef"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
@pytest.mark.parametrize(
    "table",
    [
        f'[database]\nurl = "mysql+pymysql://buildq@127.0.0.1/buildq"\npassword = "{SECRET}"\n',
        '[database]\nurl = "sqlite:///x.db"\n\n[runners.ci]\ntype = "buildkite"\n'
        f'organization = "o"\npipeline = "p"\ntoken = "{SECRET}"\n',
        '[database]\nurl = "sqlite:///x.db"\n\n[runners.ci]\ntype = "github"\nowner = "o"\n'
        f'repo = "r"\nworkflow = "w.yml"\ntoken = "{SECRET}"\n',
    ],
    ids=["db-password", "buildkite-token", "github-token"],
)
def test_a_config_holding_a_secret_must_be_private(tmp_path: Path, table: str, mode: int) -> None:
    config = tmp_path / "config" / "buildq.toml"
    config.parent.mkdir()
    config.write_text(table)
    config.chmod(mode)
    # The CLI reads the database password too; runner tokens only the daemon reads.
    for args in (("run",), ("builds", "ls")) if "password" in table else (("run",),):
        output = refused(config, *args)
        [message] = [line for line in output.splitlines() if line.startswith("buildq: ")]
        assert str(config) in message and f"chmod 600 {config}" in message, message
        assert SECRET not in output


@pytest.mark.parametrize("key", ["password_file", "token_file"])
def test_a_secret_file_must_be_private(tmp_path: Path, key: str) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    secret_file.chmod(0o644)
    table = (
        f'[database]\nurl = "mysql+pymysql://buildq@127.0.0.1/buildq"\npassword_file = "{secret_file}"\n'
        if key == "password_file"
        else '[database]\nurl = "sqlite:///x.db"\n\n[runners.ci]\ntype = "buildkite"\n'
        f'organization = "o"\npipeline = "p"\ntoken_file = "{secret_file}"\n'
    )
    config = tmp_path / "config" / "buildq.toml"
    config.parent.mkdir()
    config.write_text(table)
    config.chmod(0o600)
    message = refused(config, "run")
    assert str(secret_file) in message and f"chmod 600 {secret_file}" in message, message
    assert SECRET not in message
    secret_file.chmod(0o600)  # the fix the message names works
    if key == "password_file":
        main(["doctor", "--config", str(config), "--json"])  # loads; the server need not exist


def test_the_real_daemon_refuses_a_readable_config_with_a_secret(tmp_path: Path) -> None:
    config = tmp_path / "config" / "buildq.toml"
    config.parent.mkdir()
    config.write_text(f'[database]\nurl = "sqlite:///{tmp_path}/x.db"\npassword = "{SECRET}"\n')
    config.chmod(0o644)
    done = subprocess.run(
        [BUILDQ, "run", "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.startswith("buildq: ") and f"chmod 600 {config}" in done.stderr
    assert SECRET not in done.stderr + done.stdout and "Traceback" not in done.stderr


# --- endpoints bind to loopback unless told otherwise --------------------------------------


def test_metrics_and_webhooks_listen_on_loopback_by_default(tmp_path: Path) -> None:
    from buildq.config import load_config
    from buildq.webhook import WebhookConfig

    config = tmp_path / "buildq.toml"
    config.write_text('[database]\nurl = "sqlite:///x.db"\n')
    loaded = load_config(config, {})
    assert loaded.http.bind == "127.0.0.1"
    assert WebhookConfig.from_table(loaded.webhooks).bind == "127.0.0.1"


def test_a_running_daemon_is_only_reachable_on_loopback(daemon: MakeDaemon) -> None:
    d = daemon(
        '[runners.noop]\ntype = "noop"\n\n[queues.main]\nrunner = "noop"\n\n'
        "[webhooks]\nenabled = true\nport = 0\n"
    )
    d.start()
    events = d.events()
    listening = {e["event"]: e for e in events if e["event"].endswith("_listening")}
    assert listening["ops_http_listening"]["bind"] == "127.0.0.1"
    assert listening["webhooks_listening"]["bind"] == "127.0.0.1"
    for event in listening.values():
        port = int(event["port"])
        assert _reachable("127.0.0.1", port)
        other = _non_loopback_address()
        if other is not None:
            assert not _reachable(other, port), f"{event['event']} answers on {other}"
    assert d.stop() == 0


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def _non_loopback_address() -> str | None:
    """An address of this host that is not loopback (None on a host without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(("192.0.2.1", 9))  # TEST-NET: nothing is sent
            address = str(sock.getsockname()[0])
        except OSError:
            return None
    return None if address.startswith("127.") else address
