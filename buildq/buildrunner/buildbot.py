"""Buildbot as a BuildRunner: one forced build request per trigger, over the REST API.

A trigger calls the master's force scheduler (``POST /api/v2/forceschedulers/<name>``, a
JSON-RPC ``force``) for one builder, with the changes as properties (``buildq_request_id``,
``buildq_queue``, ``buildq_base``, ``buildq_head``: the scheduler must declare them). A build
is identified as ``bb:<build request id>``: a request survives retries of its build (a build
interrupted by a master restart is retried under the same request), so its state is the
build's state. Status reads the request and its builds; cancel cancels the request, which
also stops its running build.

The force reason carries ``buildq <request id>``, so a lost trigger is found again among the
recent buildsets (and confirmed by the buildset's ``buildq_request_id`` property).
See docs/ci-runners.md for the master side.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx

from buildq.buildrunner import _http_runner, _http_transport, registry
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
from buildq.config.base import Table

KIND = "buildbot"
REASON_PREFIX = "buildq "

#: What a trigger sends as properties: the force scheduler must declare each one, or Buildbot
#: leaves it out of the build (it takes only the fields it declares).
PROPERTIES = (CORRELATION_KEY, "buildq_queue", "buildq_base", "buildq_head")
_DOCS = "docs/ci-runners.md#buildbot"

_ID = re.compile(r"^bb:([0-9]{1,18})$")

#: Buildbot's result codes (``buildbot.process.results``) → buildq, with the failure reason.
_RESULTS: Mapping[int, tuple[str, BuildStatus, str | None]] = {
    0: ("success", BuildStatus.SUCCEEDED, None),
    1: ("warnings", BuildStatus.SUCCEEDED, None),
    2: ("failure", BuildStatus.FAILED, "verdict"),
    # A request collapsed into a newer one: superseded, not a verdict on the change.
    3: ("skipped", BuildStatus.CANCELLED, None),
    4: ("exception", BuildStatus.FAILED, "infra"),
    5: ("retry", BuildStatus.FAILED, "infra"),
    6: ("cancelled", BuildStatus.CANCELLED, None),
}


@dataclass(frozen=True, slots=True)
class BuildbotConfig:
    """``[runners.<name>]`` with ``type = "buildbot"``."""

    builder: str
    http: _http_transport.HttpSettings
    scheduler: str = "buildq"
    lookup_buildsets: int = 200
    lookup_before_trigger: bool = True

    @classmethod
    def from_table(cls, table: Table) -> BuildbotConfig:
        return cls(
            builder=table.str("builder"),
            http=_http_transport.HttpSettings.from_table(
                table, default_api_url="http://localhost:8010", token_required=False
            ),
            scheduler=table.str("scheduler", "buildq"),
            lookup_buildsets=table.int("lookup_buildsets", 200, min=1, max=5000),
            lookup_before_trigger=table.bool("lookup_before_trigger", True),
        )


def make_client(config: BuildbotConfig) -> httpx.Client:
    """The master's web URL, timeouts; a token (if set) as a bearer token for a proxy."""
    return _http_transport.make_client(config.http, {"Accept": "application/json"})


def build_id(request_id: int) -> BuildID:
    return BuildID(f"bb:{request_id}")


def parse_build_id(value: BuildID) -> int:
    match = _ID.match(value.id)
    if match is None:
        raise BuildNotFound(f"{value.id!r} is not a Buildbot build id (bb:<build request id>)")
    return int(match[1])


def map_status(
    request: Mapping[str, Any], builds: Sequence[Mapping[str, Any]]
) -> tuple[BuildStatus, BuildMetadata]:
    """A build request and its builds in buildq's terms (the newest build tells the story)."""
    latest = max(builds, key=lambda b: b.get("buildid") or 0, default=None)
    meta = _metadata(request, latest)
    if request.get("complete") is not True:
        running = any(b.get("complete") is False for b in builds)
        meta["native_state"] = "building" if running else "pending"
        return (BuildStatus.RUNNING if running else BuildStatus.ACCEPTED), meta
    code = request.get("results")
    if not isinstance(code, int) or code not in _RESULTS:
        meta["native_state"] = f"results={code}"
        return BuildStatus.UNKNOWN, meta
    word, status, reason = _RESULTS[code]
    meta["native_state"] = word
    if reason is not None:
        meta["failure_reason"] = reason
    if word == "skipped":
        meta["cancelled_by"] = "external"
    return status, meta


def _metadata(request: Mapping[str, Any], build: Mapping[str, Any] | None) -> BuildMetadata:
    meta: BuildMetadata = {}
    if _http_runner.positive_int(request.get("buildrequestid")):
        meta["buildrequest_id"] = str(request["buildrequestid"])
    if build is None:
        return meta
    for key in ("buildid", "number", "builderid"):
        if _http_runner.positive_int(build.get(key)):
            meta[key] = str(build[key])
    if isinstance(build.get("state_string"), str):
        meta["state_string"] = build["state_string"]
    started, finished = build.get("started_at"), build.get("complete_at")
    meta.update(_http_runner.time_metadata(_iso(started), _iso(finished)))
    return meta


def _iso(epoch: object) -> str | None:
    if not isinstance(epoch, int | float) or isinstance(epoch, bool) or epoch <= 0:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat()


class BuildbotRunner(_http_runner.HttpRunner[BuildbotConfig]):
    """Forces, polls and cancels build requests of one Buildbot builder. Thread-safe."""

    kind = KIND
    vendor = "Buildbot"

    def _setup(self) -> None:
        self._rpc_ids = itertools.count(1)

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        token = (metadata or {}).get(CORRELATION_KEY) or None
        request_id = token or _http_runner.new_request_id()
        params = {
            "builderNames": [self.config.builder],
            "owner": "buildq",
            "reason": REASON_PREFIX + request_id,
            CORRELATION_KEY: request_id,
            "buildq_queue": queue,
            "buildq_base": _http_runner.changes_json(base),
            "buildq_head": _http_runner.changes_json(head),
        }
        result = _http_runner.create_idempotently(
            self._core,
            token=token,
            create=lambda: self._force(params),
            lookup=lambda: self._find(request_id),
            lookup_first=self.config.lookup_before_trigger,
        )
        self._log.info(
            "runner_build_triggered", build_id=result.id, queue=queue, request_id=request_id
        )
        return result

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        brid = parse_build_id(build_id)
        reply = self._core.read("GET", f"/api/v2/buildrequests/{brid}")
        requests = reply.body.get("buildrequests") if isinstance(reply.body, Mapping) else None
        if not isinstance(requests, list) or not requests or not isinstance(requests[0], Mapping):
            raise BuildNotFound(f"Buildbot has no build request {brid}")
        reply = self._core.read("GET", f"/api/v2/buildrequests/{brid}/builds")
        builds = reply.body.get("builds") if isinstance(reply.body, Mapping) else None
        if not isinstance(builds, list):
            raise TransientRunnerError(f"Buildbot answered the builds of {build_id} without a list")
        status, meta = map_status(requests[0], [b for b in builds if isinstance(b, Mapping)])
        meta["url"] = f"{self.config.http.api_url}/#/buildrequests/{brid}"
        return status, meta

    def cancel(self, build_id: BuildID) -> None:
        brid = parse_build_id(build_id)
        if self.status(build_id)[0].is_terminal:
            self._log.info("runner_cancel_requested", build_id=build_id.id, noop=True)
            return
        # Cancelling the request also stops its build if one is running.
        self._rpc(f"/api/v2/buildrequests/{brid}", "cancel", {"reason": "cancelled by buildq"})
        self._log.info("runner_cancel_requested", build_id=build_id.id, noop=False)

    def doctor_view(self) -> tuple[Mapping[str, Any] | None, Mapping[str, Any] | None]:
        """The builder and the force scheduler as the REST API shows them (None where the
        master has none), for ``buildq doctor``."""
        builder = self.config.builder
        reply = self._core.read(
            "GET", "/api/v2/builders", params={"name": builder}, missing_is_not_found=False
        )
        builders = reply.body.get("builders") if isinstance(reply.body, Mapping) else None
        found = [
            b
            for b in (builders if isinstance(builders, list) else [])
            if isinstance(b, Mapping) and b.get("name") == builder
        ]
        path = f"/api/v2/forceschedulers/{self.config.scheduler}"
        reply = self._core.read("GET", path, accept=frozenset({404}), missing_is_not_found=False)
        schedulers = reply.body.get("forceschedulers") if isinstance(reply.body, Mapping) else None
        scheduler = schedulers[0] if isinstance(schedulers, list) and schedulers else None
        return (found[0] if found else None), (
            scheduler if reply.status == 200 and isinstance(scheduler, Mapping) else None
        )

    def _rpc(self, path: str, method: str, params: Mapping[str, Any]) -> None:
        """A JSON-RPC call that is safe to repeat (``cancel``)."""
        body = self._rpc_body(method, params)
        self._core.read("POST", path, body=body, missing_is_not_found=False)

    def _rpc_body(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "method": method, "id": next(self._rpc_ids), "params": params}

    def _force(self, params: Mapping[str, Any]) -> BuildID:
        body = self._rpc_body("force", params)
        path = f"/api/v2/forceschedulers/{self.config.scheduler}"
        answer = self._core.write_once("POST", path, body=body).body
        result = answer.get("result") if isinstance(answer, Mapping) else None
        # ``[buildset id, {builder id: build request id}]``
        if isinstance(result, list) and len(result) == 2 and isinstance(result[1], Mapping):
            brids = [v for v in result[1].values() if _http_runner.positive_int(v)]
            if len(brids) == 1:
                return build_id(brids[0])
        error = answer.get("error") if isinstance(answer, Mapping) else None
        raise RunnerError(f"Buildbot did not force one build request: {str(error or answer)[:200]}")

    def _find(self, request_id: str) -> BuildID | None:
        reply = self._core.read(
            "GET",
            "/api/v2/buildsets",
            params={"order": "-bsid", "limit": str(self.config.lookup_buildsets)},
            missing_is_not_found=False,
        )
        buildsets = reply.body.get("buildsets") if isinstance(reply.body, Mapping) else None
        matches = sorted(
            b["bsid"]
            for b in (buildsets if isinstance(buildsets, list) else [])
            if isinstance(b, Mapping)
            and _http_runner.positive_int(b.get("bsid"))
            and _http_runner.mentions_token(b.get("reason"), REASON_PREFIX + request_id)
        )
        for bsid in matches:  # should a duplicate ever exist, always settle on the first
            if self._property(bsid, CORRELATION_KEY) == request_id:
                return self._request_of(bsid)
        return None

    def _property(self, bsid: int, name: str) -> object:
        reply = self._core.read(
            "GET", f"/api/v2/buildsets/{bsid}/properties", missing_is_not_found=False
        )
        found = reply.body.get("properties") if isinstance(reply.body, Mapping) else None
        props = (
            found[0] if isinstance(found, list) and found and isinstance(found[0], Mapping) else {}
        )
        value = props.get(name)
        # Properties are ``name: [value, source]``.
        return value[0] if isinstance(value, list) and value else None

    def _request_of(self, bsid: int) -> BuildID | None:
        reply = self._core.read(
            "GET",
            "/api/v2/buildrequests",
            params={"buildsetid": str(bsid)},
            missing_is_not_found=False,
        )
        requests = reply.body.get("buildrequests") if isinstance(reply.body, Mapping) else None
        brids = [
            r["buildrequestid"]
            for r in (requests if isinstance(requests, list) else [])
            if isinstance(r, Mapping) and _http_runner.positive_int(r.get("buildrequestid"))
        ]
        return build_id(min(brids)) if brids else None


def _runner(name: str, config: BuildbotConfig) -> BuildbotRunner:
    return BuildbotRunner(config, make_client(config), name=name)


def doctor(name: str, config: BuildbotConfig) -> list[registry.DoctorRow]:
    """``buildq doctor``: does the master have the builder, and a force scheduler that can
    start it with buildq's properties? (Whether the builder collapses requests is not in
    Buildbot's REST API: docs/ci-runners.md says so.)"""
    with closing(_runner(name, config)) as runner:
        builder, scheduler = runner.doctor_view()
    label = f"runner {name} api"
    problems = list(_problems(config, builder, scheduler))
    if problems:
        return [registry.DoctorRow(label, "FAIL", detail, fix) for detail, fix in problems]
    detail = f"the master has builder {config.builder} and force scheduler {config.scheduler}"
    return [registry.DoctorRow(label, "ok", detail)]


def _problems(
    config: BuildbotConfig, builder: Mapping[str, Any] | None, scheduler: Mapping[str, Any] | None
) -> Iterator[tuple[str, str]]:
    """(what is wrong, the fix) for each way the master cannot take buildq's triggers."""
    name, sched = config.builder, config.scheduler
    if builder is None:
        yield f"the master has no builder {name!r}", "check builder against c['builders']"
    elif builder.get("masterids") == []:
        # A builder dropped from the config stays in the database, on no master.
        yield f"builder {name!r} runs on no master", "add it back to c['builders']"
    if scheduler is None:
        fix = f"add a ForceScheduler named {sched!r} for builder {name!r} (see {_DOCS})"
        yield f"the master has no force scheduler {sched!r}", fix
        return
    names = scheduler.get("builder_names")
    if not isinstance(names, list) or name not in names:
        detail = f"force scheduler {sched!r} cannot start builder {name!r}"
        yield detail, f"add {name!r} to its builderNames"
    if scheduler.get("enabled") is False:
        yield f"force scheduler {sched!r} is disabled", "enable it (web UI or config)"
    missing = [p for p in PROPERTIES if p not in set(_field_names(scheduler.get("all_fields")))]
    if missing:
        detail = (
            f"force scheduler {sched!r} does not declare {', '.join(missing)}: Buildbot would "
            f"leave {'it' if len(missing) == 1 else 'them'} out of buildq's builds"
        )
        yield detail, f"add a StringParameter for each to its properties (see {_DOCS})"


def _field_names(fields: object) -> Iterator[str]:
    """The ``fullName`` of every field of a force scheduler, nested ones included (a force
    takes its arguments by full name)."""
    for field in fields if isinstance(fields, list) else []:
        if isinstance(field, Mapping):
            if isinstance(field.get("fullName"), str):
                yield field["fullName"]
            yield from _field_names(field.get("fields"))


RUNNER_KIND = registry.RunnerKind(KIND, BuildbotConfig.from_table, _runner, doctor=doctor)
