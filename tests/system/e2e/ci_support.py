"""The fake CI services as the daemon under test sees them, and what the tests read back.

``FakeCI`` puts one vendor fake (``tests/support/fakeci``) behind the few verbs an end-to-end test
needs: the runner's TOML table, "which build did buildq start for this request", move a build
to running / passed / failed, and deliver a signed (or forged, or replayed) webhook about it.
The daemon gets the API token and the webhook secret through environment variables, as in
production; both are canary values the tests then look for everywhere the daemon writes.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from buildq.orchestrator import topics
from tests.support.daemon import BUILDQ, DaemonProcess, World
from tests.support.fakeci import FakeBuildkite, FakeGitHub, FakeService, Fault
from tests.support.fakeci.buildkite import sign as bk_sign
from tests.support.fakeci.github import sign as gh_sign

RUNNER = "ci"
TOKEN_ENV = "BUILDQ_E2E_CI_TOKEN"
SECRET_ENV = "BUILDQ_E2E_CI_WEBHOOK_SECRET"

#: Runner settings that keep failure paths short without changing what is tested.
_FAST = """\
connect_timeout_s = 2.0
read_timeout_s = 5.0
retry_backoff_s = 0.05
retry_max_backoff_s = 0.2
lookup_interval_s = 0.05
"""


def canary(what: str) -> str:
    """A secret value no code path has any business copying anywhere."""
    return f"canary-{what}-{secrets.token_hex(8)}"


class FakeCI:
    """One vendor fake, spoken to in buildq's terms (BuildIDs, outcomes)."""

    kind: str
    fake: FakeService
    #: A path fragment only the status read of a build has.
    _status_fragment: str

    def __init__(self, token: str, secret: str) -> None:
        self.token = token
        self.secret = secret
        #: BuildIDs of the builds ``foreign_build`` started, oldest first.
        self.foreign_build_ids: list[str] = []

    def env(self) -> dict[str, str]:
        """What the daemon process needs in its environment."""
        return {TOKEN_ENV: self.token, SECRET_ENV: self.secret}

    def runner_toml(self, *, webhooks: bool = False) -> str:
        secret = f'webhook_secret_env = "{SECRET_ENV}"\n' if webhooks else ""
        return (
            f'[runners.{RUNNER}]\ntype = "{self.kind}"\napi_url = "{self.fake.url}"\n'
            f'token_env = "{TOKEN_ENV}"\n{self._vendor_keys()}{_FAST}{secret}'
        )

    def stop(self) -> None:
        self.fake.stop()

    # per vendor ------------------------------------------------------------------------
    def _vendor_keys(self) -> str:
        raise NotImplementedError

    def build_ids(self) -> dict[str, str]:
        """Request id -> the BuildID buildq was given, for every build buildq started."""
        raise NotImplementedError

    def set_running(self, build_id: str) -> None:
        raise NotImplementedError

    def finish(self, build_id: str, passed: bool) -> None:
        raise NotImplementedError

    def foreign_build(self) -> str:
        """Start a build buildq did not trigger; return the BuildID a webhook would name."""
        self.foreign_build_ids.append(self._start_foreign())
        return self.foreign_build_ids[-1]

    def _start_foreign(self) -> str:
        raise NotImplementedError

    def cancel_requests(self) -> list[str]:
        """Paths of the cancel requests the fake received."""
        raise NotImplementedError

    def refuse_next_create(self, message: str) -> None:
        """The vendor answers the next create 422 with ``message`` (and creates nothing)."""
        raise NotImplementedError

    def fail_next_status(self, message: str) -> None:
        """The next status read gets a 502 whose body says ``message`` (reads are retried)."""
        self.fake.inject(
            Fault(status=502, method="GET", path=self._status_fragment, body={"message": message})
        )

    def slow_next_status(self, delay_s: float) -> None:
        """The next status read is answered ``delay_s`` late, with the state when it arrived."""
        self.fake.inject(
            Fault(delay_s=delay_s, after_handling=True, method="GET", path=self._status_fragment)
        )

    def signed_delivery(
        self, build_id: str, *, stale: bool = False
    ) -> tuple[bytes, dict[str, str]]:
        """A webhook body about ``build_id`` and headers signed with the daemon's secret."""
        raise NotImplementedError

    def forged_delivery(self, build_id: str) -> tuple[bytes, dict[str, str]]:
        """The same delivery signed with the wrong secret."""
        body, _ = self.signed_delivery(build_id)
        return self._sign(body, secret=canary("wrong-secret"))

    def oversize_delivery(self, build_id: str, size: int) -> tuple[bytes, dict[str, str]]:
        """A correctly signed delivery padded past ``size`` bytes."""
        body, _ = self.signed_delivery(build_id)
        padded = json.dumps({**json.loads(body), "padding": "x" * size}).encode()
        return self._sign(padded)

    def _sign(
        self, body: bytes, timestamp: int | None = None, secret: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        raise NotImplementedError

    def status_requests(self, build_id: str) -> list[float]:
        """When (``time.monotonic()``) the fake answered a status read of ``build_id``."""
        raise NotImplementedError


class BuildkiteCI(FakeCI):
    kind = "buildkite"
    _status_fragment = "/builds/"

    def __init__(self, token: str, secret: str) -> None:
        super().__init__(token, secret)
        self.bk = FakeBuildkite(token=token).start()
        self.fake = self.bk

    def _vendor_keys(self) -> str:
        return f'organization = "{self.bk.organization}"\npipeline = "{self.bk.pipeline}"\n'

    def _number(self, build_id: str) -> int:
        return int(build_id.rsplit("/", 1)[1])

    def _id(self, number: int) -> str:
        return f"bk:{self.bk.organization}/{self.bk.pipeline}/{number}"

    def build_ids(self) -> dict[str, str]:
        return {
            b.meta_data["buildq_request_id"]: self._id(b.number)
            for b in self.bk.builds()
            if "buildq_request_id" in b.meta_data
        }

    def set_running(self, build_id: str) -> None:
        self.bk.set_state(self._number(build_id), "running")

    def finish(self, build_id: str, passed: bool) -> None:
        self.bk.set_state(self._number(build_id), "passed" if passed else "failed")

    def _start_foreign(self) -> str:
        return self._id(self.bk.add_build({"owner": "someone else"}, state="running"))

    def cancel_requests(self) -> list[str]:
        return [r.path for r in self.bk.requests_matching("PUT", "/cancel")]

    def refuse_next_create(self, message: str) -> None:
        self.bk.inject(Fault(status=422, method="POST", path="/builds", body={"message": message}))

    def signed_delivery(
        self, build_id: str, *, stale: bool = False
    ) -> tuple[bytes, dict[str, str]]:
        number = self._number(build_id)
        event = "build.finished" if self.bk.build(number).state in _BK_FINISHED else "build.running"
        body = self.bk.webhook_payload(number, event)
        return self._sign(body, int(time.time()) - 3600 if stale else None)

    def _sign(
        self, body: bytes, timestamp: int | None = None, secret: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        event = json.loads(body).get("event", "build.finished")
        return body, {
            "Content-Type": "application/json",
            "X-Buildkite-Event": event,
            "X-Buildkite-Signature": bk_sign(body, secret or self.secret, timestamp),
        }

    def status_requests(self, build_id: str) -> list[float]:
        path = f"/builds/{self._number(build_id)}"
        return [r.at for r in self.bk.requests_matching("GET", path) if r.path.endswith(path)]


_BK_FINISHED = frozenset({"passed", "failed", "canceled"})


class GitHubCI(FakeCI):
    kind = "github"
    _status_fragment = "/attempts/"

    def __init__(self, token: str, secret: str) -> None:
        super().__init__(token, secret)
        self.gh = FakeGitHub(token=token).start()
        self.fake = self.gh

    def _vendor_keys(self) -> str:
        return (
            f'owner = "{self.gh.owner}"\nrepo = "{self.gh.repo}"\nworkflow = "{self.gh.workflow}"\n'
        )

    def _run_id(self, build_id: str) -> int:
        return int(build_id.split("/")[2])

    def _id(self, run_id: int) -> str:
        return f"gh:{self.gh.owner}/{self.gh.repo}/{run_id}/1"

    def build_ids(self) -> dict[str, str]:
        return {
            r.inputs["buildq_request_id"]: self._id(r.id)
            for r in self.gh.dispatched_runs()
            if "buildq_request_id" in r.inputs
        }

    def set_running(self, build_id: str) -> None:
        self.gh.set_status(self._run_id(build_id), "in_progress")

    def finish(self, build_id: str, passed: bool) -> None:
        self.gh.set_status(self._run_id(build_id), "completed", "success" if passed else "failure")

    def _start_foreign(self) -> str:
        return self._id(self.gh.add_run("somebody's own run"))

    def cancel_requests(self) -> list[str]:
        return [r.path for r in self.gh.requests_matching("POST", "/cancel")]

    def refuse_next_create(self, message: str) -> None:
        self.gh.inject(
            Fault(status=422, method="POST", path="/dispatches", body={"message": message})
        )

    def signed_delivery(
        self, build_id: str, *, stale: bool = False
    ) -> tuple[bytes, dict[str, str]]:
        assert not stale, "GitHub signs no timestamp: a replay cannot be told from a resend"
        return self._sign(self.gh.webhook_payload(self._run_id(build_id)))

    def _sign(
        self, body: bytes, timestamp: int | None = None, secret: str | None = None
    ) -> tuple[bytes, dict[str, str]]:
        return body, {
            "Content-Type": "application/json",
            "X-GitHub-Event": "workflow_run",
            "X-Hub-Signature-256": gh_sign(body, secret or self.secret),
        }

    def status_requests(self, build_id: str) -> list[float]:
        path = f"/runs/{self._run_id(build_id)}/attempts/1"
        return [r.at for r in self.gh.requests_matching("GET", path)]


def start_ci(kind: str) -> FakeCI:
    token, secret = canary("token"), canary("webhook-secret")
    return BuildkiteCI(token, secret) if kind == "buildkite" else GitHubCI(token, secret)


# --- the daemon's webhook receiver ------------------------------------------------------


@dataclass(frozen=True)
class Receiver:
    """The daemon's webhook endpoint for the CI runner."""

    url: str

    @classmethod
    def of(cls, daemon: DaemonProcess) -> Receiver:
        [event] = [e for e in daemon.events() if e.get("event") == "webhooks_listening"]
        return cls(f"http://127.0.0.1:{event['port']}/webhooks/{RUNNER}")

    def post(self, delivery: tuple[bytes, dict[str, str]]) -> httpx.Response:
        body, headers = delivery
        return httpx.post(self.url, content=body, headers=headers, timeout=10)


# --- reading the database ---------------------------------------------------------------


@dataclass(frozen=True)
class PendingPoll:
    message_id: str
    visible_at: int
    inflight: int


def pending_polls(world: World, build_id: str) -> list[PendingPoll]:
    """The build's live poll deliveries (normally exactly one)."""
    rows = world.rows(
        "SELECT m.message_id, d.visible_at, d.inflight FROM queue_deliveries d"
        " JOIN queue_messages m ON m.seq = d.seq"
        " WHERE d.topic = :t AND m.topic = :t AND m.partition_key = :b",
        t=topics.BUILDSIGNAL,
        b=build_id,
    )
    return [PendingPoll(r.message_id, int(r.visible_at), int(r.inflight)) for r in rows]


def settled_poll(world: World, build_id: str, at_least_ms: int) -> PendingPoll | None:
    """The build's one pending poll once it waits (not in flight) ``at_least_ms`` or more."""
    pending = pending_polls(world, build_id)
    rows = world.rows("SELECT updated_at FROM builds WHERE build_id = :b", b=build_id)
    if len(pending) != 1 or pending[0].inflight or not rows:
        return None
    return pending[0] if pending[0].visible_at - int(rows[0].updated_at) >= at_least_ms else None


def build(world: World, request_id: str) -> Any:
    [row] = world.rows("SELECT * FROM builds WHERE request_id = :r", r=request_id)
    return row


def all_stored_text(world: World) -> str:
    """Every build row and every queue message (payload and metadata), as one text."""
    parts = [repr(tuple(r)) for r in world.rows("SELECT * FROM builds")]
    for row in world.rows("SELECT topic, message_id, payload, metadata FROM queue_messages"):
        payload = bytes(row.payload).decode(errors="replace")
        parts.append(f"{row.topic} {row.message_id} {payload} {row.metadata}")
    return "\n".join(parts)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``buildq ARGS --config CONFIG`` (without the CI credentials in its environment)."""
    done = subprocess.run(
        [BUILDQ, *args, "--config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done


def cli_json(config: Path, *args: str) -> Any:
    return json.loads(cli(config, *args, "--json").stdout)
