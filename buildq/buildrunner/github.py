"""GitHub Actions as a BuildRunner: one ``workflow_dispatch`` run per trigger.

A build is identified as ``gh:<owner>/<repo>/<run_id>/<attempt>``. The attempt is pinned: a
re-run of a finished run is a new attempt of the same run id, and polling "the run" would let
it overwrite a verdict already stored for the first attempt. Status therefore reads
``/runs/{id}/attempts/{n}``.

The changes reach the workflow as inputs ``queue``, ``base`` and ``head`` (JSON strings) and
the request id as ``buildq_request_id``, which the workflow's ``run-name`` must show: GitHub
servers that answer a dispatch with 204 and no run id leave the run-name as the only way to
find the run again. See docs/ci-runners.md for the workflow side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import httpx

from buildq.buildrunner import _http_runner, _http_transport, _ratelimit, _siblings, registry
from buildq.buildrunner._github_status import map_status
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
from buildq.config.base import Secret, Table

KIND = "github"
DEFAULT_API_URL = "https://api.github.com"
DEFAULT_API_VERSION = "2022-11-28"
#: GitHub's documented cap on the whole ``inputs`` object of one dispatch.
MAX_INPUT_CHARS = 65_535

_ID = re.compile(r"^gh:([A-Za-z0-9_.-]+)/([A-Za-z0-9_.-]+)/([0-9]+)/([0-9]+)$")
_RUNS_PER_PAGE = 100
_MAX_LOOKUP_PAGES = 3
#: GitHub run ids are signed 64-bit (the gh: id does not cap their digits as the others do).
_MAX_RUN_ID = 2**63
#: Runs are listed by creation time on GitHub's clock; allow for ours being ahead.
_CLOCK_SLACK_S = 300.0


@dataclass(frozen=True, slots=True)
class GitHubConfig:
    """``[runners.<name>]`` with ``type = "github"``."""

    owner: str
    repo: str
    workflow: str
    http: _http_transport.HttpSettings
    ref: str = "main"
    api_version: str = DEFAULT_API_VERSION
    return_run_details: bool = True
    lookup_before_trigger: bool = True
    lookup_window_s: float = 6 * 3600.0
    conditional_requests: bool = True
    webhook_secret: Secret | None = None

    @classmethod
    def from_table(cls, table: Table) -> GitHubConfig:
        table.choice("type", (KIND,), KIND)
        return cls(
            owner=table.str("owner"),
            repo=table.str("repo"),
            workflow=table.str("workflow"),
            http=_http_transport.HttpSettings.from_table(table, default_api_url=DEFAULT_API_URL),
            ref=table.str("ref", "main"),
            api_version=table.str("api_version", DEFAULT_API_VERSION),
            return_run_details=table.bool("return_run_details", True),
            lookup_before_trigger=table.bool("lookup_before_trigger", True),
            lookup_window_s=table.float("lookup_window_s", 6 * 3600.0, min=60.0),
            conditional_requests=table.bool("conditional_requests", True),
            webhook_secret=table.secret("webhook_secret", required=False),
        )


def make_client(config: GitHubConfig) -> httpx.Client:
    """The client a GitHubRunner is given: API base URL, bearer token, timeouts."""
    headers = {"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": config.api_version}
    return _http_transport.make_client(config.http, headers)


def build_id(owner: str, repo: str, run_id: int, attempt: int) -> BuildID:
    return BuildID(f"gh:{owner}/{repo}/{run_id}/{attempt}")


def parse_build_id(value: BuildID) -> tuple[str, str, int, int]:
    match = _ID.match(value.id)
    # "." and ".." are no names: in a URL path they would name another resource.
    if match is None or {match[1], match[2]} & {".", ".."}:
        raise BuildNotFound(f"{value.id!r} is not a GitHub build id (gh:<owner>/<repo>/<run>/<n>)")
    return match[1], match[2], int(match[3]), int(match[4])


def build_id_from_event(payload: Mapping[str, Any]) -> BuildID | None:
    """The BuildID a ``workflow_run`` webhook is about (that run's attempt)."""
    run, repository = payload.get("workflow_run"), payload.get("repository")
    if not isinstance(run, Mapping) or not isinstance(repository, Mapping):
        return None
    owner, _, repo = str(repository.get("full_name", "")).partition("/")
    run_id, attempt = run.get("id"), run.get("run_attempt", 1)
    valid = _http_runner.positive_int
    if not (owner and repo and valid(run_id, _MAX_RUN_ID) and valid(attempt, _MAX_RUN_ID)):
        return None
    found = build_id(owner, repo, run_id, attempt)
    # Only an id buildq could have issued (a run it did not dispatch is ignored anyway).
    return found if _ID.match(found.id) else None


def verify_signature(
    headers: Mapping[str, str], body: bytes, secret: str, *, now: float, tolerance_s: float
) -> str | None:
    """None if ``X-Hub-Signature-256: sha256=S`` is HMAC-SHA256 over the body, else why not.
    GitHub signs no timestamp: a replay only causes an extra poll."""
    header = headers.get("x-hub-signature-256")
    if not header:
        return "unsigned"
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), header.strip().encode(errors="replace")):
        return "bad_signature"
    return None


def decode_event(headers: Mapping[str, str], payload: Mapping[str, Any]) -> BuildID | None:
    """The run attempt a ``workflow_run`` delivery is about; None for other events."""
    if headers.get("x-github-event", "") != "workflow_run":
        return None
    found = build_id_from_event(payload)
    if found is None:
        raise registry.MalformedEvent("no run in a workflow_run event")
    return found


def rate_signal(response: httpx.Response) -> _ratelimit.RateSignal:
    """GitHub's ``x-ratelimit-*`` (reset is epoch seconds) and secondary limits (403/429)."""
    signal = _ratelimit.limit_headers(response, "x-ratelimit-", reset_is_epoch=True)
    if response.status_code not in (403, 429):
        return signal
    headers = response.headers
    retry_after = _ratelimit.header_number(headers, "retry-after")
    # The header as sent, not the budget's whole number: "0.5" left is not "none left".
    exhausted = _ratelimit.header_number(headers, "x-ratelimit-remaining") == 0
    if retry_after is not None:
        limited = retry_after
    elif exhausted and signal.reset_in_s is not None:
        limited = signal.reset_in_s
    elif response.status_code == 429 or "rate limit" in response.text.lower():
        # GitHub: with neither header, wait at least a minute.
        limited = 60.0
    else:
        return signal
    return replace(signal, limited_for_s=limited)


class GitHubRunner(_http_runner.HttpRunner[GitHubConfig]):
    """Dispatches, polls and cancels runs of one GitHub Actions workflow. Thread-safe."""

    kind = KIND
    vendor = "GitHub"
    rate_signal = staticmethod(rate_signal)

    def _setup(self) -> None:
        # Cleared for good once the server says it does not know the field (older GHES).
        self._ask_run_details = self.config.return_run_details

    def trigger(
        self,
        queue: str,
        base: Sequence[Change],
        head: Sequence[Change],
        metadata: Mapping[str, str] | None = None,
    ) -> BuildID:
        token = (metadata or {}).get(CORRELATION_KEY) or None
        request_id = token or _http_runner.new_request_id()
        inputs = _inputs(queue, base, head, request_id)
        cfg = self.config

        def create() -> BuildID:
            dispatched_at = time.time()
            reply = self._dispatch(inputs)
            body = reply.body if isinstance(reply.body, Mapping) else {}
            run_id = body.get("workflow_run_id")
            if isinstance(run_id, int):
                return build_id(cfg.owner, cfg.repo, run_id, 1)
            found = _http_runner.poll_lookup(
                self._core, lambda: self._find_by_token(request_id, dispatched_at - _CLOCK_SLACK_S)
            )
            if found is None:
                raise TransientRunnerError(
                    f"GitHub accepted the dispatch but no run named with {request_id!r} appeared"
                )
            return found

        result = _http_runner.create_idempotently(
            self._core,
            token=token,
            create=create,
            lookup=lambda: self._find_by_token(request_id, time.time() - cfg.lookup_window_s),
            lookup_first=cfg.lookup_before_trigger,
        )
        self._log.info(
            "runner_build_triggered", build_id=result.id, queue=queue, request_id=request_id
        )
        return result

    def status(self, build_id: BuildID) -> tuple[BuildStatus, BuildMetadata]:
        owner, repo, run_id, attempt = parse_build_id(build_id)
        try:
            reply = self._core.read(
                "GET",
                f"/repos/{owner}/{repo}/actions/runs/{run_id}/attempts/{attempt}",
                conditional=self.config.conditional_requests,
            )
        except BuildNotFound as err:
            raise _http_runner.confirm_missing(
                self._core, err, f"/repos/{owner}/{repo}", f"repository {owner}/{repo}"
            ) from None
        if not isinstance(reply.body, Mapping):
            raise TransientRunnerError(f"GitHub answered run {build_id} without a body")
        return map_status(reply.body)

    def cancel(self, build_id: BuildID) -> None:
        owner, repo, run_id, _ = parse_build_id(build_id)
        # Cancel acts on the run's latest attempt: once our attempt is finished, a re-run
        # someone started must not be cancelled on its behalf.
        current, _ = self.status(build_id)
        if current.is_terminal:
            self._log.info("runner_cancel_requested", build_id=build_id.id, noop=True)
            return
        # 409: the run completed meanwhile: nothing to do.
        reply = self._core.read(
            "POST", f"/repos/{owner}/{repo}/actions/runs/{run_id}/cancel", accept=frozenset({409})
        )
        self._log.info("runner_cancel_requested", build_id=build_id.id, noop=reply.status == 409)

    def workflow_file(self) -> str | None:
        """The workflow's file at ``ref``, for ``buildq doctor``; None when the token may not
        read it (that needs Contents: read, which triggering and polling do not)."""
        cfg = self.config
        repository = f"/repos/{cfg.owner}/{cfg.repo}"
        workflow = self._core.read(
            "GET", f"{repository}/actions/workflows/{cfg.workflow}", missing_is_not_found=False
        ).body
        path = workflow.get("path") if isinstance(workflow, Mapping) else None
        if not isinstance(path, str):
            return None
        try:
            reply = self._core.read(
                "GET",
                f"{repository}/contents/{path}",
                params={"ref": cfg.ref},
                missing_is_not_found=False,
            )
        except (RunnerUnauthorized, _http_transport.VendorError):
            return None
        body = reply.body if isinstance(reply.body, Mapping) else {}
        if body.get("encoding") != "base64" or not isinstance(body.get("content"), str):
            return None
        return base64.b64decode(body["content"]).decode("utf-8", errors="replace")

    def _dispatch(self, inputs: Mapping[str, str]) -> _http_transport.Reply:
        cfg = self.config
        path = f"/repos/{cfg.owner}/{cfg.repo}/actions/workflows/{cfg.workflow}/dispatches"
        body: dict[str, Any] = {"ref": cfg.ref, "inputs": dict(inputs)}
        if not self._ask_run_details:
            return self._core.write_once("POST", path, body=body)
        try:
            return self._core.write_once("POST", path, body={**body, "return_run_details": True})
        except _http_transport.VendorError as err:
            # A 4xx means nothing was dispatched, so asking again without the field is safe.
            if err.status not in (400, 422) or "return_run_details" not in str(err):
                raise
        self._ask_run_details = False
        self._log.warning("runner_run_details_unsupported")
        return self._core.write_once("POST", path, body=body)

    def _find_by_token(self, request_id: str, since_epoch: float) -> BuildID | None:
        cfg = self.config
        since = datetime.fromtimestamp(since_epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        matches: list[int] = []
        for page in range(1, _MAX_LOOKUP_PAGES + 1):
            reply = self._core.read(
                "GET",
                f"/repos/{cfg.owner}/{cfg.repo}/actions/workflows/{cfg.workflow}/runs",
                params={
                    "event": "workflow_dispatch",
                    "created": f">={since}",
                    "per_page": str(_RUNS_PER_PAGE),
                    "page": str(page),
                },
                missing_is_not_found=False,
            )
            runs = reply.body.get("workflow_runs") if isinstance(reply.body, Mapping) else None
            runs = runs if isinstance(runs, list) else []
            matches += [
                run["id"]
                for run in runs
                if isinstance(run, Mapping)
                and isinstance(run.get("id"), int)
                and _http_runner.mentions_token(run.get("display_title"), request_id)
            ]
            if matches or len(runs) < _RUNS_PER_PAGE:
                break
        if not matches:
            return None
        # The dispatch created attempt 1; should a duplicate exist, always pick the first run.
        return build_id(cfg.owner, cfg.repo, min(matches), 1)


def _inputs(
    queue: str, base: Sequence[Change], head: Sequence[Change], request_id: str
) -> dict[str, str]:
    inputs = {
        CORRELATION_KEY: request_id,
        "queue": queue,
        "base": _http_runner.changes_json(base),
        "head": _http_runner.changes_json(head),
    }
    size = len(json.dumps(inputs, separators=(",", ":"), ensure_ascii=False))
    if size > MAX_INPUT_CHARS:
        raise RunnerError(
            f"GitHub workflow inputs would be {size} characters (limit {MAX_INPUT_CHARS}): "
            f"{len(base)} base and {len(head)} head changes are too many for one dispatch"
        )
    return inputs


def _runner(name: str, config: GitHubConfig) -> GitHubRunner:
    return GitHubRunner(config, make_client(config), name=name)


def doctor(name: str, config: GitHubConfig) -> list[registry.DoctorRow]:
    """``buildq doctor``: can the token see the workflow; does its ``concurrency`` cancel
    buildq's runs (skipped when the token may not read the file)."""
    with closing(_runner(name, config)) as runner:
        workflow = runner.workflow_file()
    warnings = None if workflow is None else _siblings.github_warnings(workflow)
    unseen = (
        f"cannot read {config.workflow} at {config.ref} (the token lacks Contents: read): "
        "its concurrency settings were not checked"
    )
    where = f"workflow {config.workflow} of {config.owner}/{config.repo}"
    fix = _siblings.GITHUB_FIX.format(path=config.workflow)
    return _siblings.rows(name, where, warnings, fix, unseen)


RUNNER_KIND = registry.RunnerKind(
    KIND,
    GitHubConfig.from_table,
    _runner,
    registry.WebhookSpec(verify_signature, decode_event),
    doctor=doctor,
)
