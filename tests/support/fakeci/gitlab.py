"""A fake GitLab REST API (v4: the pipeline endpoints buildq uses), in memory, on 127.0.0.1.

Written from GitLab's API documentation (Pipelines API, Pipeline triggers API, REST API
authentication and pagination, Webhook events, rate limits); python-gitlab drives it in
tests/integration/runners/test_fakes_match_clients.py (``ProjectPipelineManager``: paths
``/projects/{id}/pipeline`` and ``/pipelines``, its list filters including ``name``;
``Project.trigger_pipeline``: ``/projects/{id}/trigger/pipeline`` with ``token``, ``ref`` and a
``variables`` object). A project is addressed by its numeric id or its URL-encoded path.
``GET /projects/:id`` shows the CI/CD setting ``auto_cancel_pending_pipelines`` ("enabled" or
"disabled") to a Maintainer's token only, as GitLab's ``API::Entities::Project`` does.

An access token is accepted as ``Authorization: Bearer`` (what buildq sends) or in the
``PRIVATE-TOKEN`` header (what python-gitlab sends), as GitLab accepts both. The trigger
endpoint is authenticated by the trigger token in its body and needs no access token, but one
that is sent must be valid. Lists are paginated with GitLab's headers (``X-Page``,
``X-Per-Page``, ``X-Next-Page``, ``X-Prev-Page``, ``X-Total``, ``X-Total-Pages`` and ``Link``).

Pipelines advance only when told (``set_status``). ``named=False`` plays a project whose
``.gitlab-ci.yml`` lacks ``workflow:name``, so its pipelines have no name.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote, urlencode

import httpx

from ._server import FakeService, Reply, Request, iso

TOKEN = "glpat-fake-SECRET-0123456789"
TRIGGER_TOKEN = "glptt-fake-TRIGGER-0123456789"
FINISHED = frozenset({"success", "failed", "canceled", "skipped"})
#: GitLab answers at most 100 items a page, whatever ``per_page`` asks for.
MAX_PER_PAGE = 100
STARTED = frozenset({"running", "canceling", "success", "failed", "canceled", "manual"})


@dataclass
class FakePipeline:
    id: int
    project_id: int
    ref: str
    source: str
    variables: dict[str, str]
    name: str | None
    status: str = "created"
    sha: str = "0123456789abcdef0123456789abcdef01234567"
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None


class FakeGitLab(FakeService):
    def __init__(
        self,
        *,
        project_id: int = 42,
        project_path: str = "acme/app",
        token: str = TOKEN,
        trigger_token: str = TRIGGER_TOKEN,
        rate_limit: int = 2000,
        window_s: float = 60.0,
        named: bool = True,
    ) -> None:
        super().__init__(token=token, rate_limit=rate_limit, window_s=window_s)
        self.project_id = project_id
        self.project_path = project_path
        self.trigger_token = trigger_token
        self.named = named
        self.auto_cancel_pending_pipelines = "disabled"
        self.maintainer = True  # whether the token's role may see the project's CI/CD settings
        #: False plays a token that lost access: GitLab then answers 404 for the project and
        #: for everything under it, as it does for a project that does not exist.
        self.visible = True
        self._pipelines: dict[int, FakePipeline] = {}
        self._next_id = 1000

    # test commands ---------------------------------------------------------------------
    def pipelines(self) -> list[FakePipeline]:
        with self.lock:
            return sorted(self._pipelines.values(), key=lambda p: p.id)

    def pipeline(self, pipeline_id: int) -> FakePipeline:
        with self.lock:
            return self._pipelines[pipeline_id]

    def set_status(self, pipeline_id: int, status: str) -> None:
        with self.lock:
            self._enter(self._pipelines[pipeline_id], status)

    def webhook_payload(self, pipeline_id: int) -> bytes:
        with self.lock:
            pipeline = self._pipelines[pipeline_id]
            return json.dumps(
                {
                    "object_kind": "pipeline",
                    "object_attributes": self._json(pipeline),
                    "project": {"id": self.project_id, "path_with_namespace": self.project_path},
                }
            ).encode()

    def send_webhook(self, url: str, secret: str, pipeline_id: int) -> httpx.Response:
        headers = {
            "Content-Type": "application/json",
            "X-Gitlab-Event": "Pipeline Hook",
            "X-Gitlab-Token": secret,
        }
        return httpx.post(url, content=self.webhook_payload(pipeline_id), headers=headers)

    # vendor hooks ----------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        """An access token as a bearer token or in ``PRIVATE-TOKEN``; none at all only for the
        trigger endpoint, which checks the trigger token in its body (``_trigger``)."""
        bearer = request.headers.get("authorization")
        private = request.headers.get("private-token")
        if bearer is None and private is None:
            return request.method == "POST" and request.path.endswith("/trigger/pipeline")
        return (bearer is None or bearer == f"Bearer {self.token}") and (
            private is None or private == self.token
        )

    def rate_headers(self, now: float) -> dict[str, str]:
        reset_epoch = int(time.time() + self.rate.reset_in(now))
        return {
            "RateLimit-Limit": str(self.rate.limit),
            "RateLimit-Observed": str(self.rate.limit - max(self.rate.remaining, 0)),
            "RateLimit-Remaining": str(max(self.rate.remaining, 0)),
            "RateLimit-Reset": str(reset_epoch),
            "RateLimit-ResetTime": formatdate(reset_epoch, usegmt=True),
        }

    def rate_limited(self, now: float) -> Reply:
        reply = Reply(429, {"message": "Retry later"})
        reply.headers["Retry-After"] = str(self.rate.reset_in(now))
        return reply

    def route(self, request: Request) -> Reply:
        parts = [unquote(p) for p in request.path.strip("/").split("/")]
        if parts[:3] != ["api", "v4", "projects"] or len(parts) < 4:
            return Reply(404, {"message": "404 Not Found"})
        if parts[3] not in (str(self.project_id), self.project_path) or not self.visible:
            return Reply(404, {"message": "404 Project Not Found"})
        if len(parts) == 4:
            if request.method != "GET":
                return Reply(404, {"message": "404 Not Found"})
            return Reply(200, self._project_json())
        rest, method = parts[4:], request.method
        if rest == ["pipeline"] and method == "POST":
            return self._create(request.body, "api")
        if rest == ["trigger", "pipeline"] and method == "POST":
            return self._trigger(request.body)
        if rest == ["pipelines"] and method == "GET":
            return self._list(request)
        pipeline = self._pipelines.get(int(rest[1])) if rest[1:2] and rest[1].isdigit() else None
        if rest[0] != "pipelines" or pipeline is None:
            return Reply(404, {"message": "404 Not found"})
        if len(rest) == 2 and method == "GET":
            return Reply(200, self._json(pipeline), cacheable=True)
        if rest[2:] == ["cancel"] and method == "POST":
            if pipeline.status not in FINISHED:
                self._enter(pipeline, "canceled")
            return Reply(200, self._json(pipeline))
        if rest[2:] == ["variables"] and method == "GET":
            return Reply(
                200,
                [
                    {"key": k, "value": v, "variable_type": "env_var"}
                    for k, v in pipeline.variables.items()
                ],
            )
        return Reply(404, {"message": "404 Not found"})

    # endpoints -------------------------------------------------------------------------
    def _create(self, body: Any, source: str) -> Reply:
        if not isinstance(body, dict) or not isinstance(body.get("ref"), str):
            return Reply(400, {"error": "ref is missing"})
        variables = body.get("variables") or []
        if not isinstance(variables, list) or not all(
            isinstance(v, dict)
            and isinstance(v.get("key"), str)
            and isinstance(v.get("value"), str)
            for v in variables
        ):
            return Reply(400, {"error": "variables is invalid"})
        values = {v["key"]: v["value"] for v in variables}
        pipeline = self._new(self.project_id, body["ref"], source, values)
        return Reply(201, self._json(pipeline))

    def _trigger(self, body: Any) -> Reply:
        if not isinstance(body, dict) or body.get("token") != self.trigger_token:
            return Reply(404, {"message": "404 Not Found"})
        variables = body.get("variables") or {}
        if not isinstance(variables, dict) or not all(
            isinstance(v, str) for v in variables.values()
        ):
            return Reply(400, {"error": "variables is invalid"})
        if not isinstance(body.get("ref"), str):
            return Reply(400, {"error": "ref is missing"})
        pipeline = self._new(self.project_id, body["ref"], "trigger", dict(variables))
        return Reply(201, self._json(pipeline))

    def _list(self, request: Request) -> Reply:
        pipelines = sorted(self._pipelines.values(), key=lambda p: p.id)
        if request.param("sort", "desc") == "desc":
            pipelines.reverse()
        for name in ("ref", "name", "status", "source"):
            wanted = request.param(name)
            if wanted is not None:
                pipelines = [p for p in pipelines if getattr(p, name) == wanted]
        after = request.param("updated_after")
        if after is not None:
            pipelines = [p for p in pipelines if iso(p.updated_at) >= after]
        per_page = min(max(int(request.param("per_page", "20") or 20), 1), MAX_PER_PAGE)
        page = max(int(request.param("page", "1") or 1), 1)
        chunk = pipelines[(page - 1) * per_page : page * per_page]
        return Reply(
            200,
            [self._list_json(p) for p in chunk],
            self._pagination(request, page, per_page, len(pipelines)),
        )

    def _pagination(self, request: Request, page: int, per_page: int, total: int) -> dict[str, str]:
        """GitLab's offset pagination headers, ``Link`` with the request's own filters."""
        pages = max((total + per_page - 1) // per_page, 1)
        query = {k: v[0] for k, v in request.query.items() if k not in ("page", "per_page")}

        def link(number: int) -> str:
            params = urlencode({**query, "page": number, "per_page": per_page})
            return f"<{self.url}{request.path}?{params}>"

        links = [f'{link(page - 1)}; rel="prev"'] if 1 < page <= pages else []
        links += [f'{link(page + 1)}; rel="next"'] if page < pages else []
        links += [f'{link(1)}; rel="first"', f'{link(pages)}; rel="last"']
        return {
            "X-Page": str(page),
            "X-Per-Page": str(per_page),
            "X-Next-Page": str(page + 1) if page < pages else "",
            "X-Prev-Page": str(page - 1) if 1 < page <= pages else "",
            "X-Total": str(total),
            "X-Total-Pages": str(pages),
            "Link": ", ".join(links),
        }

    def _new(
        self, project_id: int, ref: str, source: str, variables: dict[str, str]
    ) -> FakePipeline:
        self._next_id += 1
        request_id = variables.get("BUILDQ_REQUEST_ID")
        name = f"buildq {request_id}" if self.named and request_id is not None else None
        pipeline = FakePipeline(self._next_id, project_id, ref, source, variables, name)
        self._pipelines[pipeline.id] = pipeline
        return pipeline

    def _enter(self, pipeline: FakePipeline, status: str) -> None:
        pipeline.status = status
        pipeline.updated_at = time.time()
        if status in STARTED and pipeline.started_at is None:
            pipeline.started_at = time.time()
        if status in FINISHED and pipeline.finished_at is None:
            pipeline.finished_at = time.time()

    def _list_json(self, pipeline: FakePipeline) -> dict[str, Any]:
        return {
            "id": pipeline.id,
            "iid": pipeline.id - 1000,
            "project_id": pipeline.project_id,
            "sha": pipeline.sha,
            "ref": pipeline.ref,
            "status": pipeline.status,
            "source": pipeline.source,
            "name": pipeline.name,
            "created_at": iso(pipeline.created_at),
            "updated_at": iso(pipeline.updated_at),
            "web_url": f"{self.url}/{self.project_path}/-/pipelines/{pipeline.id}",
        }

    def _json(self, pipeline: FakePipeline) -> dict[str, Any]:
        return {
            **self._list_json(pipeline),
            "before_sha": "0" * 40,
            "tag": False,
            "yaml_errors": None,
            "user": {"id": 7, "username": "buildq-bot"},
            "started_at": iso(pipeline.started_at) if pipeline.started_at else None,
            "finished_at": iso(pipeline.finished_at) if pipeline.finished_at else None,
            "committed_at": None,
            "duration": None,
            "queued_duration": None,
            "coverage": None,
            "detailed_status": {"group": pipeline.status, "text": pipeline.status},
        }

    def _project_json(self) -> dict[str, Any]:
        project: dict[str, Any] = {
            "id": self.project_id,
            "path_with_namespace": self.project_path,
            "default_branch": "main",
            "web_url": f"{self.url}/{self.project_path}",
        }
        if self.maintainer:
            project["auto_cancel_pending_pipelines"] = self.auto_cancel_pending_pipelines
        return project
