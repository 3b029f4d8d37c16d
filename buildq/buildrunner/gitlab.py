"""GitLab CI as a BuildRunner: one pipeline per trigger, on one project and ref.

A build is identified as ``gl:<project id>/<pipeline id>``, the numeric ids GitLab's pipeline
endpoints take (a project configured by its path is still addressed by the id the create
answered, so renaming or moving the project does not orphan running builds).

The changes reach the pipeline as CI/CD variables (``BUILDQ_QUEUE``, ``BUILDQ_BASE``,
``BUILDQ_HEAD``, ``BUILDQ_REQUEST_ID``), through the pipelines API or, with
``trigger_token_*`` set, a pipeline trigger token. The pipeline's name must be
``buildq $BUILDQ_REQUEST_ID`` (``workflow:name``): listing pipelines filters on names, not
variables, so that is how a lost create is found again. See docs/ci-runners.md.
"""

from __future__ import annotations

import hmac
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from buildq.buildrunner import _http_runner, _http_transport, _ratelimit, _siblings, registry
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerError,
    TransientRunnerError,
)
from buildq.config.base import Secret, Table

KIND = "gitlab"
DEFAULT_API_URL = "https://gitlab.com/api/v4"
MANUAL_AS = ("failed", "running")
NAME_PREFIX = "buildq "

_ID = re.compile(r"^gl:([0-9]{1,18})/([0-9]{1,18})$")
_LOOKUP_PAGE = 20

#: GitLab pipeline ``status`` → buildq. ``manual`` and ``scheduled`` are decided in
#: ``map_status`` (they depend on config and on whether the pipeline has started).
_STATES: Mapping[str, BuildStatus] = {
    "created": BuildStatus.ACCEPTED,
    "waiting_for_resource": BuildStatus.ACCEPTED,
    "waiting_for_callback": BuildStatus.ACCEPTED,
    "preparing": BuildStatus.ACCEPTED,
    "pending": BuildStatus.ACCEPTED,
    "running": BuildStatus.RUNNING,
    "canceling": BuildStatus.RUNNING,
    "success": BuildStatus.SUCCEEDED,
    "failed": BuildStatus.FAILED,
    "canceled": BuildStatus.CANCELLED,
    "skipped": BuildStatus.FAILED,
}


@dataclass(frozen=True, slots=True)
class GitLabConfig:
    """``[runners.<name>]`` with ``type = "gitlab"``."""

    project: str
    http: _http_transport.HttpSettings
    ref: str = "main"
    trigger_token: Secret | None = None
    manual_as: str = "failed"
    lookup_before_trigger: bool = True
    lookup_window_s: float = 6 * 3600.0
    conditional_requests: bool = True
    webhook_secret: Secret | None = None

    @classmethod
    def from_table(cls, table: Table) -> GitLabConfig:
        return cls(
            project=table.str("project"),
            http=_http_transport.HttpSettings.from_table(table, default_api_url=DEFAULT_API_URL),
            ref=table.str("ref", "main"),
            trigger_token=table.secret("trigger_token", required=False),
            manual_as=table.choice("manual_as", MANUAL_AS, "failed"),
            lookup_before_trigger=table.bool("lookup_before_trigger", True),
            lookup_window_s=table.float("lookup_window_s", 6 * 3600.0, min=60.0),
            conditional_requests=table.bool("conditional_requests", True),
            webhook_secret=table.secret("webhook_secret", required=False),
        )


def make_client(config: GitLabConfig) -> httpx.Client:
    """API base URL (``…/api/v4``), the access token as a bearer token, timeouts."""
    return _http_transport.make_client(config.http, {"Accept": "application/json"})


def build_id(project_id: int, pipeline_id: int) -> BuildID:
    return BuildID(f"gl:{project_id}/{pipeline_id}")


def parse_build_id(value: BuildID) -> tuple[int, int]:
    match = _ID.match(value.id)
    if match is None:
        raise BuildNotFound(f"{value.id!r} is not a GitLab build id (gl:<project>/<pipeline>)")
    return int(match[1]), int(match[2])


def pipeline_name(request_id: str) -> str:
    """The name ``workflow:name: "buildq $BUILDQ_REQUEST_ID"`` gives the pipeline."""
    return NAME_PREFIX + request_id


def rate_signal(response: httpx.Response) -> _ratelimit.RateSignal:
    """GitLab's ``RateLimit-*`` headers (``RateLimit-Reset`` is epoch seconds) and 429s."""
    signal = _ratelimit.limit_headers(response, "RateLimit-", reset_is_epoch=True)
    if response.status_code != 429:
        return signal
    retry_after = _ratelimit.header_number(response.headers, "Retry-After")
    limited = retry_after if retry_after is not None else (signal.reset_in_s or 60.0)
    return replace(signal, limited_for_s=limited)


def map_status(pipeline: Mapping[str, Any], manual_as: str) -> tuple[BuildStatus, BuildMetadata]:
    """A pipeline's ``status`` in buildq's terms; the raw status stays in ``native_state``."""
    state = str(pipeline.get("status", ""))
    meta = _metadata(pipeline)
    meta["native_state"] = state
    if state == "manual":
        # Waiting for someone to press play: it never finishes by itself.
        if manual_as == "running":
            return BuildStatus.RUNNING, meta
        meta["failure_reason"] = "verdict"
        return BuildStatus.FAILED, meta
    if state == "scheduled":
        # A delayed job waits for its timer: it will go on by itself.
        started = bool(pipeline.get("started_at"))
        return (BuildStatus.RUNNING if started else BuildStatus.ACCEPTED), meta
    status = _STATES.get(state, BuildStatus.UNKNOWN)
    if state == "failed":
        meta["failure_reason"] = "verdict"
    elif state == "skipped":
        # Every job was skipped: nothing was tested, which is not a pass and not the
        # change's fault either (the CI config ruled everything out).
        meta["failure_reason"] = "infra"
    return status, meta


def _metadata(pipeline: Mapping[str, Any]) -> BuildMetadata:
    meta: BuildMetadata = {}
    for key, source in (("url", "web_url"), ("sha", "sha"), ("branch", "ref"), ("title", "name")):
        value = pipeline.get(source)
        if isinstance(value, str) and value:
            meta[key] = value
    if _http_runner.positive_int(pipeline.get("id")):
        meta["pipeline_id"] = str(pipeline["id"])
    if isinstance(pipeline.get("source"), str):
        meta["source"] = pipeline["source"]
    meta.update(_http_runner.time_metadata(pipeline.get("started_at"), pipeline.get("finished_at")))
    return meta


def verify_token(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    """GitLab sends the webhook's secret token itself in ``X-Gitlab-Token`` (no signature, no
    timestamp: a replay only causes an extra poll)."""
    token = headers.get("x-gitlab-token")
    if not token:
        return "unsigned"
    if not hmac.compare_digest(token.encode(errors="replace"), secret.encode()):
        return "bad_token"
    return None


def build_id_from_event(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    """The BuildID a Pipeline Hook delivery is about; None for other events."""
    if payload.get("object_kind") != "pipeline":
        return None  # job, push, merge request events: nothing to poll
    attributes, project = payload.get("object_attributes"), payload.get("project")
    if not isinstance(attributes, Mapping) or not isinstance(project, Mapping):
        raise registry.MalformedEvent("a pipeline event without its pipeline")
    pipeline_id, project_id = attributes.get("id"), project.get("id")
    if not (_http_runner.positive_int(pipeline_id) and _http_runner.positive_int(project_id)):
        raise registry.MalformedEvent("a pipeline event without ids")
    return build_id(project_id, pipeline_id)


class GitLabRunner(_http_runner.HttpRunner[GitLabConfig]):
    """Creates, polls and cancels pipelines of one GitLab project. Thread-safe."""

    kind = KIND
    vendor = "GitLab"
    rate_signal = staticmethod(rate_signal)

    def _setup(self) -> None:
        self._project = quote(self.config.project, safe="")

    def _secrets(self) -> Sequence[Secret]:
        # GitLab's error text may quote what it was sent, the trigger token included.
        return () if self.config.trigger_token is None else (self.config.trigger_token,)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        token = (metadata or {}).get(CORRELATION_KEY) or None
        request_id = token or _http_runner.new_request_id()
        variables = {
            "BUILDQ_QUEUE": queue,
            "BUILDQ_BASE": _http_runner.changes_json(base),
            "BUILDQ_HEAD": _http_runner.changes_json(head),
            "BUILDQ_REQUEST_ID": request_id,
        }
        result = _http_runner.create_idempotently(
            self._core,
            token=token,
            create=lambda: self._create(variables, request_id),
            lookup=lambda: self._find_by_name(request_id),
            lookup_first=self.config.lookup_before_trigger,
        )
        self._log.info(
            "runner_build_triggered", build_id=result.id, queue=queue, request_id=request_id
        )
        return result

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        project_id, pipeline_id = parse_build_id(build_id)
        try:
            reply = self._core.read(
                "GET",
                f"/projects/{project_id}/pipelines/{pipeline_id}",
                conditional=self.config.conditional_requests,
            )
        except BuildNotFound as err:
            # GitLab answers 404 for every path of a project the token cannot see.
            raise _http_runner.confirm_missing(
                self._core, err, f"/projects/{project_id}", f"project {project_id}"
            ) from None
        if not isinstance(reply.body, Mapping):
            raise TransientRunnerError(f"GitLab answered pipeline {build_id} without a body")
        return map_status(reply.body, self.config.manual_as)

    def cancel(self, build_id: BuildID) -> None:
        project_id, pipeline_id = parse_build_id(build_id)
        current, _ = self.status(build_id)
        if current.is_terminal:
            self._log.info("runner_cancel_requested", build_id=build_id.id, noop=True)
            return
        # A pipeline that finished meanwhile may be refused: nothing left to do then.
        reply = self._core.read(
            "POST",
            f"/projects/{project_id}/pipelines/{pipeline_id}/cancel",
            accept=frozenset({400, 409, 422}),
        )
        self._log.info("runner_cancel_requested", build_id=build_id.id, noop=reply.status >= 400)

    def project(self) -> Mapping[str, Any]:
        """The project as the API shows it to this token, for ``buildq doctor`` (its CI/CD
        settings are shown to a Maintainer only)."""
        reply = self._core.read("GET", f"/projects/{self._project}", missing_is_not_found=False)
        return reply.body if isinstance(reply.body, Mapping) else {}

    def _create(self, variables: Mapping[str, str], request_id: str) -> BuildID:
        trigger = self.config.trigger_token
        if trigger is None:
            path = f"/projects/{self._project}/pipeline"
            body: dict[str, Any] = {
                "ref": self.config.ref,
                "variables": [
                    {"key": k, "value": v, "variable_type": "env_var"} for k, v in variables.items()
                ],
            }
        else:
            path = f"/projects/{self._project}/trigger/pipeline"
            body = {"token": trigger.reveal(), "ref": self.config.ref, "variables": variables}
        reply = self._core.write_once("POST", path, body=body)
        pipeline = reply.body if isinstance(reply.body, Mapping) else {}
        if not (
            _http_runner.positive_int(pipeline.get("id"))
            and _http_runner.positive_int(pipeline.get("project_id"))
        ):
            raise RunnerError("GitLab answered the create without pipeline and project ids")
        if pipeline.get("name", pipeline_name(request_id)) != pipeline_name(request_id):
            # Without the name a lost create could not be found again: say so once per create.
            self._log.warning("runner_pipeline_unnamed", expected=pipeline_name(request_id))
        return build_id(pipeline["project_id"], pipeline["id"])

    def _find_by_name(self, request_id: str) -> BuildID | None:
        since = datetime.fromtimestamp(time.time() - self.config.lookup_window_s, UTC)
        reply = self._core.read(
            "GET",
            f"/projects/{self._project}/pipelines",
            params={
                "ref": self.config.ref,
                "name": pipeline_name(request_id),
                "updated_after": since.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "order_by": "id",
                "sort": "asc",
                "per_page": str(_LOOKUP_PAGE),
            },
            missing_is_not_found=False,
        )
        found = [
            (p["project_id"], p["id"])
            for p in (reply.body if isinstance(reply.body, list) else [])
            if isinstance(p, Mapping)
            and p.get("name") == pipeline_name(request_id)
            and _http_runner.positive_int(p.get("id"))
            and _http_runner.positive_int(p.get("project_id"))
        ]
        # Should a duplicate ever exist, every lookup settles on the same (first) pipeline.
        return build_id(*min(found, key=lambda f: f[1])) if found else None


def _runner(name: str, config: GitLabConfig) -> GitLabRunner:
    return GitLabRunner(config, make_client(config), name=name)


def doctor(name: str, config: GitLabConfig) -> list[registry.DoctorRow]:
    """``buildq doctor``: can the token see the project; does it cancel buildq's pipelines."""
    with closing(_runner(name, config)) as runner:
        project = runner.project()
    unseen = (
        "the token cannot see the project's CI/CD settings (they need the Maintainer role): "
        "Auto-cancel redundant pipelines was not checked"
    )
    warnings = _siblings.gitlab_warnings(project, config.ref)
    where = f"project {config.project}"
    return _siblings.rows(name, where, warnings, _siblings.GITLAB_FIX, unseen)


RUNNER_KIND = registry.RunnerKind(
    KIND,
    GitLabConfig.from_table,
    _runner,
    registry.WebhookSpec(verify_token, build_id_from_event),
    doctor=doctor,
)
