"""Jenkins as a BuildRunner: one ``buildWithParameters`` build of one job per trigger.

Jenkins answers a trigger with a queue item, not a build, and forgets the item minutes after
the build starts; it also merges queued requests with identical parameters into one build.
So every trigger carries the request id as the parameter ``BUILDQ_REQUEST_ID`` (never two
equal requests), and a build is identified as ``jk:<job>/<queue id>/<token>``, where token is
a digest of the request id: the queue item says which build it became while Jenkins remembers
it, and after that the job's recent builds are searched for the one whose
``BUILDQ_REQUEST_ID`` has that digest (its ``queueId`` must match too).

Authentication is a user's API token (HTTP basic); requests made with one need no CSRF crumb,
but a server that asks for one (403 "No valid crumb") gets it from ``/crumbIssuer/api/json``.
See docs/ci-runners.md for the job side.
"""

from __future__ import annotations

import base64
import hashlib
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from buildq.buildrunner import _http_runner, _http_transport, _siblings, registry
from buildq.buildrunner.contract import (
    CORRELATION_KEY,
    BuildID,
    BuildMetadata,
    BuildNotFound,
    BuildStatus,
    Change,
    RunnerError,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.config.base import ConfigError, Table

T = TypeVar("T")
KIND = "jenkins"
PARAMETER = "BUILDQ_REQUEST_ID"
UNSTABLE_AS = ("failed", "succeeded")

_ID = re.compile(r"^jk:(.+)/([0-9]{1,18})/([0-9a-f]{16})$")
_JOB_SEGMENT = re.compile(r"^[^/\x00-\x1f]+$")
_NUMBERS_KEPT = 4096
_FAILED_REASON: Mapping[str, str] = {
    "FAILURE": "verdict",
    "UNSTABLE": "verdict",
    "NOT_BUILT": "infra",
}


@dataclass(frozen=True, slots=True)
class JenkinsConfig:
    """``[runners.<name>]`` with ``type = "jenkins"``."""

    job: str
    user: str
    http: _http_transport.HttpSettings
    unstable_as: str = "failed"
    search_builds: int = 100
    lookup_before_trigger: bool = True
    conditional_requests: bool = True

    @classmethod
    def from_table(cls, table: Table) -> JenkinsConfig:
        job = table.str("job").strip("/")
        if not _is_job_name(job):
            raise ConfigError(table.key("job"), job, "a job's full name (folders joined by /)")
        return cls(
            job=job,
            user=table.str("user"),
            http=_http_transport.HttpSettings.from_table(
                table, default_api_url="http://localhost:8080"
            ),
            unstable_as=table.choice("unstable_as", UNSTABLE_AS, "failed"),
            search_builds=table.int("search_builds", 100, min=1, max=1000),
            lookup_before_trigger=table.bool("lookup_before_trigger", True),
            conditional_requests=table.bool("conditional_requests", True),
        )


def make_client(config: JenkinsConfig) -> httpx.Client:
    """Jenkins root URL, ``user:api token`` as HTTP basic auth, timeouts, a cookie jar (a
    crumb is only valid with the session it was issued to)."""
    pair = f"{config.user}:{config.http.token.reveal()}".encode()
    basic = "Basic " + base64.b64encode(pair).decode()
    return _http_transport.make_client(
        config.http, {"Authorization": basic, "Accept": "application/json"}
    )


def token_of(request_id: str) -> str:
    return hashlib.sha256(request_id.encode()).hexdigest()[:16]


def build_id(job: str, queue_id: int, token: str) -> BuildID:
    return BuildID(f"jk:{job}/{queue_id}/{token}")


def parse_build_id(value: BuildID) -> tuple[str, int, str]:
    match = _ID.match(value.id)
    if match is None or not _is_job_name(match[1]):
        raise BuildNotFound(f"{value.id!r} is not a Jenkins build id (jk:<job>/<queue id>/<token>)")
    return match[1], int(match[2]), match[3]


def _is_job_name(job: str) -> bool:
    """Folders joined by ``/``; "." and ".." are no names: in a URL path they would name
    another resource."""
    return all(_JOB_SEGMENT.match(part) and part not in (".", "..") for part in job.split("/"))


def job_path(job: str) -> str:
    """``folder/name`` → ``/job/folder/job/name``."""
    return "".join(f"/job/{quote(part, safe='')}" for part in job.split("/"))


def map_status(
    item: Mapping[str, Any] | None, build: Mapping[str, Any] | None, unstable_as: str
) -> tuple[BuildStatus, BuildMetadata]:
    """A queue item and/or its build in buildq's terms; the raw state stays in ``native_state``."""
    if build is None:
        if item is not None and item.get("cancelled") is True:
            return BuildStatus.CANCELLED, {"native_state": "queue_cancelled"}
        meta = {"native_state": "queued"}
        if item is not None and isinstance(item.get("why"), str):
            meta["why"] = item["why"]
        return BuildStatus.ACCEPTED, meta
    meta = _metadata(build)
    result = build.get("result")
    if build.get("building") is True or (result is None and build.get("inProgress") is True):
        meta["native_state"] = "building"
        return BuildStatus.RUNNING, meta
    meta["native_state"] = str(result)
    if result == "SUCCESS" or (result == "UNSTABLE" and unstable_as == "succeeded"):
        return BuildStatus.SUCCEEDED, meta
    if result == "ABORTED":
        return BuildStatus.CANCELLED, meta
    if isinstance(result, str) and result in _FAILED_REASON:
        meta["failure_reason"] = _FAILED_REASON[result]
        return BuildStatus.FAILED, meta
    return BuildStatus.UNKNOWN, meta


def _metadata(build: Mapping[str, Any]) -> BuildMetadata:
    meta: BuildMetadata = {}
    if isinstance(build.get("url"), str):
        meta["url"] = build["url"]
    if _http_runner.positive_int(build.get("number")):
        meta["number"] = str(build["number"])
    started_ms, duration_ms = build.get("timestamp"), build.get("duration")
    if _http_runner.positive_int(started_ms):
        start = datetime.fromtimestamp(started_ms / 1000, UTC)
        finished = _http_runner.positive_int(duration_ms) and build.get("building") is not True
        end = start + timedelta(milliseconds=int(duration_ms or 0)) if finished else None
        meta.update(_http_runner.time_metadata(start.isoformat(), end.isoformat() if end else None))
    request_id = _parameters(build).get(PARAMETER)
    if request_id is not None:
        meta[CORRELATION_KEY] = request_id
    return meta


def _parameters(thing: object) -> dict[str, str]:
    """The string parameters a build or queue item carries (in its ParametersAction)."""
    out: dict[str, str] = {}
    actions = thing.get("actions") if isinstance(thing, Mapping) else None
    for action in actions if isinstance(actions, list) else []:
        parameters = action.get("parameters") if isinstance(action, Mapping) else None
        for parameter in parameters if isinstance(parameters, list) else []:
            if not isinstance(parameter, Mapping):
                continue
            name, value = parameter.get("name"), parameter.get("value")
            if isinstance(name, str) and isinstance(value, str):
                out[name] = value
    return out


def _has_token(thing: object, token: str) -> bool:
    request_id = _parameters(thing).get(PARAMETER)
    return request_id is not None and token_of(request_id) == token


class JenkinsRunner(_http_runner.HttpRunner[JenkinsConfig]):
    """Builds, polls and stops builds of one Jenkins job. Thread-safe."""

    kind = KIND
    vendor = "Jenkins"

    def _setup(self) -> None:
        self._lock = threading.Lock()
        #: Queue id → build number, so polls skip the queue once the build is known. Only a
        #: shortcut: a restarted runner finds the same numbers again.
        self._numbers: OrderedDict[tuple[str, int], int] = OrderedDict()

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        token = (metadata or {}).get(CORRELATION_KEY) or None
        request_id = token or _http_runner.new_request_id()
        form = {
            PARAMETER: request_id,
            "BUILDQ_QUEUE": queue,
            "BUILDQ_BASE": _http_runner.changes_json(base),
            "BUILDQ_HEAD": _http_runner.changes_json(head),
        }
        job = self.config.job
        result = _http_runner.create_idempotently(
            self._core,
            token=token,
            create=lambda: self._create(form, token_of(request_id)),
            lookup=lambda: self._find(job, token_of(request_id)),
            lookup_first=self.config.lookup_before_trigger,
        )
        self._log.info(
            "runner_build_triggered", build_id=result.id, queue=queue, request_id=request_id
        )
        return result

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        job, queue_id, token = parse_build_id(build_id)
        try:
            item, build = self._state(job, queue_id, token)
        except BuildNotFound as err:
            # Jenkins answers 404 for a job the user may not read: without Job/Read the
            # build is hidden, not gone.
            raise _http_runner.confirm_missing(
                self._core, err, f"{job_path(job)}/api/json", f"job {job}"
            ) from None
        return map_status(item, build, self.config.unstable_as)

    def cancel(self, build_id: BuildID) -> None:
        job, queue_id, token = parse_build_id(build_id)
        item, build = self._state(job, queue_id, token)
        status, _ = map_status(item, build, self.config.unstable_as)
        if status.is_terminal:
            self._log.info("runner_cancel_requested", build_id=build_id.id, noop=True)
            return
        if build is not None:
            self._stop(job, build)
        else:
            try:
                self._post("/queue/cancelItem", {"id": str(queue_id)})
            except TransientRunnerError:
                # Jenkins answers 500 "Could not cancel run" for an item that left the queue
                # since it was read: its build started (or someone cancelled it). Stop that
                # build rather than fail: a cancel at the deadline is not asked again.
                item, build = self._state(job, queue_id, token)
                status, _ = map_status(item, build, self.config.unstable_as)
                if build is None and not status.is_terminal:
                    raise  # still waiting: a real failure, asked again on the next poll
                if build is not None and not status.is_terminal:
                    self._stop(job, build)
        self._log.info("runner_cancel_requested", build_id=build_id.id, noop=False)

    def _stop(self, job: str, build: Mapping[str, Any]) -> None:
        self._post(f"{job_path(job)}/{build['number']}/stop", {})

    def _post(self, path: str, params: Mapping[str, str]) -> None:
        """A cancel or a stop. Jenkins answers cancelItem 204 and stop with a redirect to the
        build's page; a 404 means the item or build is gone (forgotten, or deleted)."""
        self._with_crumb(
            lambda: self._core.read("POST", path, params=params, accept=frozenset({404}))
        )

    def job(self) -> Mapping[str, Any]:
        """The job as the remote API shows it (its properties), for ``buildq doctor``."""
        path = f"{job_path(self.config.job)}/api/json"
        reply = self._core.read("GET", path, missing_is_not_found=False)
        return reply.body if isinstance(reply.body, Mapping) else {}

    def _create(self, form: Mapping[str, str], token: str) -> BuildID:
        path = f"{job_path(self.config.job)}/buildWithParameters"
        reply = self._with_crumb(lambda: self._core.write_once("POST", path, form=form))
        location = reply.headers.get("location", "")
        last = location.rstrip("/").rsplit("/", 1)[-1]
        if "/queue/item/" not in location or not last.isdigit():
            raise RunnerError(
                f"Jenkins answered the build request {reply.status} without a queue item "
                "(is the job parameterised with BUILDQ_REQUEST_ID?)"
            )
        return build_id(self.config.job, int(last), token)

    def _with_crumb(self, send: Callable[[], T]) -> T:
        try:
            return send()
        except RunnerUnauthorized as err:
            # A 403 created nothing, so asking again with a crumb cannot duplicate a build.
            # Jenkins says "No valid crumb" in a 403 like any refusal: only that text tells.
            if "answered 403" not in str(err) or "crumb" not in str(err).lower():
                raise
        reply = self._core.read("GET", "/crumbIssuer/api/json", missing_is_not_found=False)
        body = reply.body if isinstance(reply.body, Mapping) else {}
        field, crumb = body.get("crumbRequestField"), body.get("crumb")
        if not (isinstance(field, str) and isinstance(crumb, str)):
            raise RunnerError("Jenkins asked for a CSRF crumb but its crumb issuer gave none")
        with self._lock:
            self._core.client.headers[field] = crumb
        self._log.info("runner_crumb_fetched")
        return send()

    def _state(
        self, job: str, queue_id: int, token: str
    ) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
        """The build's queue item (while Jenkins remembers it) and its build (once started)."""
        with self._lock:
            number = self._numbers.get((job, queue_id))
        item: Mapping[str, Any] | None = None
        if number is None:
            reply = self._core.read(
                "GET", f"/queue/item/{queue_id}/api/json", accept=frozenset({404})
            )
            if reply.status == 200 and isinstance(reply.body, Mapping):
                item = reply.body
                if not _has_token(item, token):
                    raise BuildNotFound(f"Jenkins queue item {queue_id} is not jk:{job}/…/{token}")
                executable = item.get("executable")
                number = executable.get("number") if isinstance(executable, Mapping) else None
                if not _http_runner.positive_int(number):
                    return item, None
            else:
                number = self._search(job, queue_id, token)
        build = self._build(job, number)
        if build is None or not self._matches(build, queue_id, token):
            raise BuildNotFound(f"Jenkins has no build for jk:{job}/{queue_id}/{token}")
        with self._lock:
            self._numbers[(job, queue_id)] = number
            while len(self._numbers) > _NUMBERS_KEPT:
                self._numbers.popitem(last=False)
        return item, build

    def _build(self, job: str, number: int) -> Mapping[str, Any] | None:
        reply = self._core.read(
            "GET",
            f"{job_path(job)}/{number}/api/json",
            conditional=self.config.conditional_requests,
        )
        return reply.body if isinstance(reply.body, Mapping) else None

    @staticmethod
    def _matches(build: Mapping[str, Any], queue_id: int, token: str) -> bool:
        return _has_token(build, token) and build.get("queueId") in (None, queue_id)

    def _recent_builds(self, job: str) -> list[Mapping[str, Any]]:
        """The job's newest ``search_builds`` builds: number, queue id and parameters."""
        fields = "number,queueId,actions[parameters[name,value]]"
        tree = f"builds[{fields}]{{0,{self.config.search_builds}}}"
        reply = self._core.read("GET", f"{job_path(job)}/api/json", params={"tree": tree})
        builds = reply.body.get("builds") if isinstance(reply.body, Mapping) else None
        return [b for b in builds if isinstance(b, Mapping)] if isinstance(builds, list) else []

    def _search(self, job: str, queue_id: int, token: str) -> int:
        """The number of the build a forgotten queue item became, from the job's history."""
        for build in self._recent_builds(job):
            if _http_runner.positive_int(build.get("number")) and self._matches(
                build, queue_id, token
            ):
                return int(build["number"])
        raise BuildNotFound(f"Jenkins has no build for jk:{job}/{queue_id}/{token}")

    def _find(self, job: str, token: str) -> BuildID | None:
        """A queue item or build of an earlier trigger with this token, if any."""
        tree = "items[id,task[url],actions[parameters[name,value]]]"
        reply = self._core.read("GET", "/queue/api/json", params={"tree": tree})
        items = reply.body.get("items") if isinstance(reply.body, Mapping) else None
        for item in items if isinstance(items, list) else []:
            task = item.get("task") if isinstance(item, Mapping) else None
            url = str(task.get("url", "")) if isinstance(task, Mapping) else ""
            ours = _has_token(item, token) and url.rstrip("/").endswith(job_path(job))
            if ours and _http_runner.positive_int(item.get("id")):
                return build_id(job, item["id"], token)
        for build in self._recent_builds(job):
            if _has_token(build, token) and _http_runner.positive_int(build.get("queueId")):
                return build_id(job, build["queueId"], token)
        return None


def _runner(name: str, config: JenkinsConfig) -> JenkinsRunner:
    return JenkinsRunner(config, make_client(config), name=name)


def doctor(name: str, config: JenkinsConfig) -> list[registry.DoctorRow]:
    """``buildq doctor``: can the user see the job; does a new build abort the running one."""
    with closing(_runner(name, config)) as runner:
        job = runner.job()
    unseen = (
        "the job's JSON does not show its properties and concurrentBuild: whether "
        "disableConcurrentBuilds aborts running builds was not checked"
    )
    warnings = _siblings.jenkins_warnings(job)
    return _siblings.rows(name, f"job {config.job}", warnings, _siblings.JENKINS_FIX, unseen)


RUNNER_KIND = registry.RunnerKind(KIND, JenkinsConfig.from_table, _runner, doctor=doctor)
