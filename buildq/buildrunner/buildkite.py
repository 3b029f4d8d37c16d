"""Buildkite Pipelines as a BuildRunner: one Buildkite build per trigger, on one pipeline.

A build is identified as ``bk:<organization>/<pipeline>/<number>``: the build number is what
Buildkite's single-build endpoints take, and carrying the organization and pipeline in the id
keeps status and cancel working for builds started before a config change. Buildkite rebuilds
get a new number, so a stored verdict never moves under a retry.

The change lists reach the build as environment variables (``BUILDQ_QUEUE``, ``BUILDQ_BASE``,
``BUILDQ_HEAD``, ``BUILDQ_REQUEST_ID``); the request id is also build meta-data, which is what
makes a lost create findable again (Buildkite's list endpoint filters on meta-data).
See docs/ci-runners.md for the pipeline side.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

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

KIND = "buildkite"
DEFAULT_API_URL = "https://api.buildkite.com"
BLOCKED_AS = ("failed", "running")

_ID = re.compile(r"^bk:([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/([0-9]+)$")
_MAX_NUMBER_DIGITS = 18
_API_BUILD_PATH = re.compile(r"/organizations/([^/]+)/pipelines/([^/]+)/builds/([0-9]+)/?$")

_STATES: Mapping[str, BuildStatus] = {
    "creating": BuildStatus.ACCEPTED,
    "scheduled": BuildStatus.ACCEPTED,
    "running": BuildStatus.RUNNING,
    "failing": BuildStatus.RUNNING,
    "waiting": BuildStatus.RUNNING,
    "waiting_failed": BuildStatus.RUNNING,
    "canceling": BuildStatus.RUNNING,
    "passed": BuildStatus.SUCCEEDED,
    "failed": BuildStatus.FAILED,
    "not_run": BuildStatus.FAILED,
    "canceled": BuildStatus.CANCELLED,
    "skipped": BuildStatus.CANCELLED,
}


@dataclass(frozen=True, slots=True)
class BuildkiteConfig:
    """``[runners.<name>]`` with ``type = "buildkite"``."""

    organization: str
    pipeline: str
    http: _http_transport.HttpSettings
    branch: str = "main"
    commit: str = "HEAD"
    blocked_as: str = "failed"
    lookup_before_trigger: bool = True
    conditional_requests: bool = True
    webhook_secret: Secret | None = None

    @classmethod
    def from_table(cls, table: Table) -> BuildkiteConfig:
        table.choice("type", (KIND,), KIND)
        return cls(
            organization=table.str("organization"),
            pipeline=table.str("pipeline"),
            http=_http_transport.HttpSettings.from_table(table, default_api_url=DEFAULT_API_URL),
            branch=table.str("branch", "main"),
            commit=table.str("commit", "HEAD"),
            blocked_as=table.choice("blocked_as", BLOCKED_AS, "failed"),
            lookup_before_trigger=table.bool("lookup_before_trigger", True),
            conditional_requests=table.bool("conditional_requests", True),
            webhook_secret=table.secret("webhook_secret", required=False),
        )


def make_client(config: BuildkiteConfig) -> httpx.Client:
    """The client a BuildkiteRunner is given: API base URL, bearer token, timeouts."""
    return _http_transport.make_client(config.http, {"Accept": "application/json"})


def build_id(organization: str, pipeline: str, number: int) -> BuildID:
    return BuildID(f"bk:{organization}/{pipeline}/{number}")


def parse_build_id(value: BuildID) -> tuple[str, str, int]:
    match = _ID.match(value.id)
    # "." and ".." are no slugs: in a URL path they would name another resource.
    if match is None or {match[1], match[2]} & {".", ".."}:
        raise BuildNotFound(f"{value.id!r} is not a Buildkite build id (bk:<org>/<pipeline>/<n>)")
    return match[1], match[2], int(match[3])


def build_id_from_event(payload: Mapping[str, Any]) -> BuildID | None:
    """The BuildID a ``build.*`` webhook is about (the id ``trigger`` returned for it)."""
    build = payload.get("build")
    if not isinstance(build, Mapping) or not isinstance(build.get("url"), str):
        return None
    try:
        path = urlsplit(build["url"]).path
    except ValueError:  # not a URL at all
        return None
    match = _API_BUILD_PATH.search(path)
    if match is None or len(match[3]) > _MAX_NUMBER_DIGITS:
        return None
    found = build_id(match[1], match[2], int(match[3]))
    # Only an id buildq could have issued (a build it did not trigger is ignored anyway).
    return found if _ID.match(found.id) else None


def verify_signature(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    """None if ``X-Buildkite-Signature: timestamp=T,signature=S`` is HMAC-SHA256 over
    ``T.body`` and T is within ``tolerance_s`` of now, else why not (never echoing values)."""
    header = headers.get("x-buildkite-signature")
    if not header:
        return "unsigned"
    parts = dict(p.strip().partition("=")[::2] for p in header.split(","))
    timestamp, signature = parts.get("timestamp", ""), parts.get("signature", "")
    if not timestamp.isdigit() or not signature:
        return "malformed_signature"
    expected = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    if not hmac.compare_digest(expected.hexdigest().encode(), signature.encode(errors="replace")):
        return "bad_signature"
    # Checked after the signature, which covers the timestamp: a replay cannot move it.
    if abs(now - int(timestamp)) > tolerance_s:
        return "stale_timestamp"
    return None


def decode_event(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    """The build a ``build.*`` delivery is about; None for other events (ping, jobs)."""
    if not headers.get("x-buildkite-event", "").startswith("build."):
        return None
    found = build_id_from_event(payload)
    if found is None:
        raise registry.MalformedEvent("no build in a build event")
    return found


def rate_signal(response: httpx.Response) -> _ratelimit.RateSignal:
    """Buildkite's ``RateLimit-*`` headers; ``RateLimit-Reset`` is seconds from now."""
    signal = _ratelimit.limit_headers(response, "RateLimit-", reset_is_epoch=False)
    if response.status_code != 429:
        return signal
    reset = signal.reset_in_s
    retry_after = _ratelimit.header_number(response.headers, "Retry-After")
    limited = max(reset if reset is not None else (retry_after or 60.0), 0.0)
    return replace(signal, limited_for_s=limited)


def map_status(build: Mapping[str, Any], blocked_as: str) -> tuple[BuildStatus, BuildMetadata]:
    """Buildkite's build ``state`` in buildq's terms; the raw state stays in ``native_state``."""
    state = str(build.get("state", ""))
    meta = _metadata(build)
    meta["native_state"] = state
    # Webhook-era payloads report a build stopped at a block step as passed + blocked.
    if state == "blocked" or (state == "passed" and build.get("blocked") is True):
        meta["native_state"] = "blocked"
        if blocked_as == "running":
            return BuildStatus.RUNNING, meta
        meta["failure_reason"] = "verdict"
        return BuildStatus.FAILED, meta
    status = _STATES.get(state, BuildStatus.UNKNOWN)
    if state == "failing":
        meta["early_failure"] = "true"
    elif status is BuildStatus.FAILED:
        meta["failure_reason"] = "verdict"
    elif state == "skipped":
        meta["cancelled_by"] = "external"
    return status, meta


def _metadata(build: Mapping[str, Any]) -> BuildMetadata:
    meta: BuildMetadata = {}
    for key, source in (
        ("url", "web_url"),
        ("sha", "commit"),
        ("branch", "branch"),
        ("cancel_reason", "cancel_reason"),
    ):
        value = build.get(source)
        if isinstance(value, str) and value:
            meta[key] = value
    if isinstance(build.get("number"), int):
        meta["number"] = str(build["number"])
    request_id = (build.get("meta_data") or {}).get(CORRELATION_KEY)
    if isinstance(request_id, str):
        meta[CORRELATION_KEY] = request_id
    meta.update(_http_runner.time_metadata(build.get("started_at"), build.get("finished_at")))
    return meta


class BuildkiteRunner(_http_runner.HttpRunner[BuildkiteConfig]):
    """Triggers, polls and cancels builds of one Buildkite pipeline. Thread-safe."""

    kind = KIND
    vendor = "Buildkite"
    rate_signal = staticmethod(rate_signal)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        metadata = dict(metadata or {})
        token = metadata.get(CORRELATION_KEY) or None
        request_id = token or _http_runner.new_request_id()
        body = self._create_body(queue, base, head, metadata, request_id)
        path = self._builds_path(self.config.organization, self.config.pipeline)

        def create() -> BuildID:
            return self._id_of(self._core.write_once("POST", path, body=body).body)

        result = _http_runner.create_idempotently(
            self._core,
            token=token,
            create=create,
            lookup=lambda: self._find_by_token(request_id),
            lookup_first=self.config.lookup_before_trigger,
        )
        self._log.info(
            "runner_build_triggered", build_id=result.id, queue=queue, request_id=request_id
        )
        return result

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        org, pipeline, number = parse_build_id(build_id)
        try:
            reply = self._core.read(
                "GET",
                f"{self._builds_path(org, pipeline)}/{number}",
                conditional=self.config.conditional_requests,
            )
        except BuildNotFound as err:
            raise _http_runner.confirm_missing(
                self._core,
                err,
                f"/v2/organizations/{org}/pipelines/{pipeline}",
                f"pipeline {org}/{pipeline}",
            ) from None
        if not isinstance(reply.body, Mapping):
            raise TransientRunnerError(f"Buildkite answered build {build_id} without a body")
        return map_status(reply.body, self.config.blocked_as)

    def cancel(self, build_id: BuildID) -> None:
        org, pipeline, number = parse_build_id(build_id)
        path = f"{self._builds_path(org, pipeline)}/{number}/cancel"
        # 422: the build is finished (or blocked) and can't be cancelled: nothing to do.
        reply = self._core.read("PUT", path, accept=frozenset({422}))
        self._log.info("runner_cancel_requested", build_id=build_id.id, noop=reply.status == 422)

    def pipeline(self) -> Mapping[str, Any]:
        """The pipeline as the API shows it (its build settings), for ``buildq doctor``."""
        org, pipeline = self.config.organization, self.config.pipeline
        path = f"/v2/organizations/{org}/pipelines/{pipeline}"
        reply = self._core.read("GET", path, missing_is_not_found=False)
        return reply.body if isinstance(reply.body, Mapping) else {}

    @staticmethod
    def _builds_path(organization: str, pipeline: str) -> str:
        return f"/v2/organizations/{organization}/pipelines/{pipeline}/builds"

    def _create_body(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str],
        request_id: str,
    ) -> dict[str, Any]:
        # Buildkite refuses empty meta-data values; caller metadata is echoed when it can be.
        meta_data = {k: v for k, v in metadata.items() if isinstance(v, str) and v.strip()}
        meta_data[CORRELATION_KEY] = request_id
        return {
            "commit": self.config.commit,
            "branch": self.config.branch,
            "message": f"buildq {queue}: {len(head)} change(s) [{request_id}]",
            "env": {
                "BUILDQ_QUEUE": queue,
                "BUILDQ_BASE": _http_runner.changes_json(base),
                "BUILDQ_HEAD": _http_runner.changes_json(head),
                "BUILDQ_REQUEST_ID": request_id,
            },
            "meta_data": meta_data,
        }

    def _id_of(self, build: object) -> BuildID:
        if not isinstance(build, Mapping) or not isinstance(build.get("number"), int):
            raise RunnerError("Buildkite answered the create without a build number")
        return build_id(self.config.organization, self.config.pipeline, build["number"])

    def _find_by_token(self, request_id: str) -> BuildID | None:
        reply = self._core.read(
            "GET",
            self._builds_path(self.config.organization, self.config.pipeline),
            params={f"meta_data[{CORRELATION_KEY}]": request_id, "per_page": "20"},
            missing_is_not_found=False,
        )
        builds = reply.body if isinstance(reply.body, list) else []
        numbers = [
            build["number"]
            for build in builds
            if isinstance(build, Mapping)
            and isinstance(build.get("number"), int)
            and (build.get("meta_data") or {}).get(CORRELATION_KEY) == request_id
        ]
        if not numbers:
            return None
        # Should a duplicate ever exist, every lookup settles on the same (first) build.
        return build_id(self.config.organization, self.config.pipeline, min(numbers))


def _runner(name: str, config: BuildkiteConfig) -> BuildkiteRunner:
    return BuildkiteRunner(config, make_client(config), name=name)


def doctor(name: str, config: BuildkiteConfig) -> list[registry.DoctorRow]:
    """``buildq doctor``: can the token see the pipeline; do its settings cancel buildq's builds."""
    with closing(_runner(name, config)) as runner:
        pipeline = runner.pipeline()
    warnings = _siblings.buildkite_warnings(pipeline, config.branch)
    where = f"pipeline {config.organization}/{config.pipeline}"
    return _siblings.rows(
        name, where, warnings, _siblings.BUILDKITE_FIX.format(branch=config.branch)
    )


RUNNER_KIND = registry.RunnerKind(
    KIND,
    BuildkiteConfig.from_table,
    _runner,
    registry.WebhookSpec(verify_signature, decode_event),
    doctor=doctor,
)
