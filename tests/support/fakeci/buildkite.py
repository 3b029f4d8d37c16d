"""A fake Buildkite REST API (the builds endpoints buildq uses), in memory, on 127.0.0.1.

    with FakeBuildkite() as bk:
        runner = BuildkiteRunner(config_for(bk), client)
        build_id = runner.trigger(...)
        bk.set_state(1, "passed")
        bk.send_webhook(receiver_url, secret, 1)

Builds advance only when told: ``set_state`` or a per-build ``script`` of states, one consumed
per GET of that build (``FakeBuildkite(script=[...])`` sets it for every new build).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._server import FakeService, Reply, Request, iso

TOKEN = "bkua_fake_SECRET_0123456789abcdef"
FINISHED = frozenset({"passed", "failed", "blocked", "canceled", "skipped", "not_run"})


@dataclass
class FakeBuild:
    organization: str
    pipeline: str
    number: int
    state: str = "scheduled"
    blocked: bool = False
    commit: str = "HEAD"
    branch: str = "main"
    message: str = ""
    env: dict[str, str] = field(default_factory=dict)
    meta_data: dict[str, str] = field(default_factory=dict)
    script: list[str] = field(default_factory=list)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    uuid: str = field(default_factory=lambda: str(uuid.uuid4()))


class FakeBuildkite(FakeService):
    def __init__(
        self,
        *,
        organization: str = "acme",
        pipeline: str = "app",
        token: str = TOKEN,
        rate_limit: int = 200,
        window_s: float = 60.0,
        script: list[str] | None = None,
    ) -> None:
        super().__init__(token=token, rate_limit=rate_limit, window_s=window_s)
        self.organization = organization
        self.pipeline = pipeline
        self.script = list(script or [])
        #: What ``GET .../pipelines/<pipeline>`` reports of the pipeline's build settings.
        self.pipeline_settings: dict[str, Any] = {
            "default_branch": "main",
            "skip_queued_branch_builds": False,
            "skip_queued_branch_builds_filter": None,
            "cancel_running_branch_builds": False,
            "cancel_running_branch_builds_filter": None,
        }
        self._builds: dict[tuple[str, str, int], FakeBuild] = {}

    # test commands ---------------------------------------------------------------------
    def builds(self) -> list[FakeBuild]:
        """Every build created so far, oldest first."""
        with self.lock:
            return sorted(self._builds.values(), key=lambda b: b.number)

    def build(self, number: int, pipeline: str | None = None) -> FakeBuild:
        with self.lock:
            return self._builds[(self.organization, pipeline or self.pipeline, number)]

    def set_state(self, number: int, state: str, *, blocked: bool | None = None) -> None:
        with self.lock:
            build = self.build(number)
            self._enter(build, state)
            build.script.clear()
            if blocked is not None:
                build.blocked = blocked

    def delete_build(self, number: int) -> None:
        """The build is gone (deleted, or the pipeline was recreated): 404 from now on."""
        with self.lock:
            del self._builds[(self.organization, self.pipeline, number)]

    def add_build(self, meta_data: dict[str, str] | None = None, state: str = "scheduled") -> int:
        """A build buildq did not create (someone pushed): returns its number."""
        with self.lock:
            build = self._new_build(self.pipeline, {"meta_data": meta_data or {}})
            self._enter(build, state)
            return build.number

    def webhook_payload(self, number: int, event: str = "build.finished") -> bytes:
        with self.lock:
            build = self.build(number)
            return json.dumps(
                {"event": event, "build": self._json(build), "pipeline": {"slug": build.pipeline}}
            ).encode()

    def send_webhook(
        self,
        url: str,
        secret: str,
        number: int,
        *,
        event: str = "build.finished",
        timestamp: int | None = None,
    ) -> httpx.Response:
        """POST a signed ``build.*`` delivery for build ``number`` to ``url``."""
        body = self.webhook_payload(number, event)
        headers = {
            "Content-Type": "application/json",
            "X-Buildkite-Event": event,
            "X-Buildkite-Signature": sign(body, secret, timestamp),
        }
        return httpx.post(url, content=body, headers=headers, timeout=5)

    # vendor hooks ----------------------------------------------------------------------
    def rate_headers(self, now: float) -> dict[str, str]:
        return {
            "RateLimit-Remaining": str(max(self.rate.remaining, 0)),
            "RateLimit-Limit": str(self.rate.limit),
            "RateLimit-Reset": str(self.rate.reset_in(now)),
        }

    def rate_limited(self, now: float) -> Reply:
        return Reply(429, {"message": "You have exceeded your API rate limit"})

    def route(self, request: Request) -> Reply:
        parts = request.path.strip("/").split("/")
        if len(parts) < 5 or parts[:2] != ["v2", "organizations"] or parts[3] != "pipelines":
            return Reply(404, {"message": "Not Found"})
        org, pipeline, rest = parts[2], parts[4], parts[5:]
        if org != self.organization:
            return Reply(404, {"message": "Not Found"})
        if not rest and request.method == "GET" and pipeline == self.pipeline:
            return Reply(200, self._pipeline_json())
        if not rest or rest[0] != "builds":
            return Reply(404, {"message": "Not Found"})
        if len(rest) == 1 and request.method == "POST":
            return self._create(pipeline, request.body or {})
        if len(rest) == 1 and request.method == "GET":
            return self._list(pipeline, request)
        build = self._builds.get((org, pipeline, int(rest[1]))) if rest[1].isdigit() else None
        if build is None:
            return Reply(404, {"message": "Not Found"})
        if len(rest) == 2 and request.method == "GET":
            if build.script:
                self._enter(build, build.script.pop(0))
            return Reply(200, self._json(build), cacheable=True)
        if rest[2:] == ["cancel"] and request.method == "PUT":
            return self._cancel(build)
        return Reply(404, {"message": "Not Found"})

    # endpoints -------------------------------------------------------------------------
    def _create(self, pipeline: str, body: dict[str, Any]) -> Reply:
        if not isinstance(body.get("commit"), str) or not isinstance(body.get("branch"), str):
            return Reply(422, {"message": "Validation failed: commit and branch are required"})
        meta = body.get("meta_data") or {}
        if any(not isinstance(v, str) or not v.strip() for v in meta.values()):
            return Reply(422, {"message": "Validation failed: meta-data values can't be blank"})
        build = self._new_build(pipeline, body)
        return Reply(201, self._json(build))

    def _new_build(self, pipeline: str, body: dict[str, Any]) -> FakeBuild:
        number = 1 + max((n for (_, p, n) in self._builds if p == pipeline), default=0)
        build = FakeBuild(
            self.organization,
            pipeline,
            number,
            commit=body.get("commit", "HEAD"),
            branch=body.get("branch", "main"),
            message=body.get("message", ""),
            env=dict(body.get("env") or {}),
            meta_data=dict(body.get("meta_data") or {}),
            script=list(self.script),
        )
        self._builds[(self.organization, pipeline, number)] = build
        return build

    def _list(self, pipeline: str, request: Request) -> Reply:
        wanted = {
            key[len("meta_data[") : -1]: values[0]
            for key, values in request.query.items()
            if key.startswith("meta_data[") and key.endswith("]")
        }
        builds = [
            b
            for b in sorted(self._builds.values(), key=lambda b: -b.number)
            if b.pipeline == pipeline and all(b.meta_data.get(k) == v for k, v in wanted.items())
        ]
        per_page = int(request.param("per_page", "30") or 30)
        page = int(request.param("page", "1") or 1)
        chunk = builds[(page - 1) * per_page : page * per_page]
        return Reply(200, [self._json(b) for b in chunk])

    def _pipeline_json(self) -> dict[str, Any]:
        base = f"{self.url}/v2/organizations/{self.organization}/pipelines/{self.pipeline}"
        return {
            "slug": self.pipeline,
            "name": self.pipeline,
            "url": base,
            "builds_url": base + "/builds",
            **self.pipeline_settings,
        }

    def _cancel(self, build: FakeBuild) -> Reply:
        if build.state in FINISHED:
            return Reply(422, {"message": "Build can't be canceled because it's already finished"})
        self._enter(build, "canceling")
        build.script = ["canceled"]
        return Reply(200, self._json(build))

    def _enter(self, build: FakeBuild, state: str) -> None:
        build.state = state
        if state in ("running", "failing") and build.started_at is None:
            build.started_at = time.time()
        if state in FINISHED and build.finished_at is None:
            build.finished_at = time.time()

    def _json(self, build: FakeBuild) -> dict[str, Any]:
        api = f"{self.url}/v2/organizations/{build.organization}/pipelines/{build.pipeline}"
        return {
            "id": build.uuid,
            "number": build.number,
            "state": build.state,
            "blocked": build.blocked or build.state == "blocked",
            "url": f"{api}/builds/{build.number}",
            "web_url": f"{self.url}/{build.organization}/{build.pipeline}/builds/{build.number}",
            "commit": build.commit,
            "branch": build.branch,
            "message": build.message,
            "env": build.env,
            "meta_data": build.meta_data,
            "source": "api",
            "created_at": iso(build.created_at),
            "started_at": iso(build.started_at) if build.started_at else None,
            "finished_at": iso(build.finished_at) if build.finished_at else None,
            "pipeline": {"slug": build.pipeline, "url": api},
        }


def sign(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """An ``X-Buildkite-Signature`` value for ``body``, as Buildkite computes it."""
    ts = int(time.time()) if timestamp is None else timestamp
    digest = hmac.new(secret.encode(), f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"timestamp={ts},signature={digest}"
