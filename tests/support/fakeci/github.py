"""A fake GitHub Actions REST API (dispatch, runs, attempts, cancel), in memory, on 127.0.0.1.

    with FakeGitHub() as gh:
        runner = GitHubRunner(config_for(gh), client)
        build_id = runner.trigger(...)
        gh.set_status(run_id, "completed", "success")
        gh.rerun(run_id)                      # attempt 2 of the same run
        gh.send_webhook(receiver_url, secret, run_id)

A dispatched run's ``display_title`` is its ``run-name``: ``run_name(inputs)``, by default
``"buildq <buildq_request_id>"`` as in docs/ci-runners.md. Servers without run details
(older GHES) are ``FakeGitHub(run_details="unsupported")`` (400 on the field) or
``"ignored"`` (204); ``dispatch_without_run_id()`` makes only the next dispatch answer 204.
"""

from __future__ import annotations

import base64
import calendar
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import httpx

from ._server import FakeService, Reply, Request, iso

TOKEN = "ghp_fake_SECRET_abcdef0123456789"
INPUTS = frozenset({"buildq_request_id", "queue", "base", "head"})
MAX_INPUT_CHARS = 65_535


@dataclass
class Attempt:
    status: str = "queued"
    conclusion: str | None = None
    created_at: float = field(default_factory=time.time)
    started_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class FakeRun:
    id: int
    display_title: str
    event: str = "workflow_dispatch"
    head_branch: str = "main"
    inputs: dict[str, str] = field(default_factory=dict)
    attempts: list[Attempt] = field(default_factory=lambda: [Attempt()])
    #: List requests still to come before this run shows up in listings.
    hidden_for_lists: int = 0


class FakeGitHub(FakeService):
    def __init__(
        self,
        *,
        owner: str = "octo",
        repo: str = "app",
        workflow: str = "buildq.yml",
        token: str = TOKEN,
        rate_limit: int = 5000,
        window_s: float = 3600.0,
        run_details: str = "supported",
        list_lag: int = 0,
        run_name: Callable[[dict[str, str]], str] | None = None,
    ) -> None:
        super().__init__(token=token, rate_limit=rate_limit, window_s=window_s)
        self.owner, self.repo, self.workflow = owner, repo, workflow
        self.run_details = run_details
        self.list_lag = list_lag
        self.run_name = run_name or (lambda inputs: f"buildq {inputs.get('buildq_request_id', '')}")
        self.secondary_limit = False
        #: Called with each dispatched run (e.g. to start an unrelated run right after it).
        self.after_dispatch: Callable[[FakeRun], None] | None = None
        #: The workflow file as ``GET .../contents/<path>`` serves it (None: 404).
        self.workflow_file: str | None = None
        #: Requests to ``/repos/<old owner>/<old repo>/...`` answer 301 to this repository.
        self.renamed_from: tuple[str, str] | None = None
        self._runs: dict[int, FakeRun] = {}
        self._next_id = 1000
        self._no_details_next = 0

    # test commands ---------------------------------------------------------------------
    def runs(self) -> list[FakeRun]:
        """Every run so far, oldest first."""
        with self.lock:
            return sorted(self._runs.values(), key=lambda r: r.id)

    def dispatched_runs(self) -> list[FakeRun]:
        return [r for r in self.runs() if r.inputs]

    def run(self, run_id: int) -> FakeRun:
        with self.lock:
            return self._runs[run_id]

    def set_status(
        self, run_id: int, status: str, conclusion: str | None = None, *, attempt: int | None = None
    ) -> None:
        with self.lock:
            run = self._runs[run_id]
            target = run.attempts[(attempt or len(run.attempts)) - 1]
            target.status, target.conclusion, target.updated_at = status, conclusion, time.time()

    def rerun(self, run_id: int) -> int:
        """Re-run a finished run: a new attempt of the same run id. Returns its number."""
        with self.lock:
            run = self._runs[run_id]
            assert run.attempts[-1].status == "completed", "only finished runs can be re-run"
            run.attempts.append(Attempt())
            return len(run.attempts)

    def delete_run(self, run_id: int) -> None:
        """Someone deleted the run: 404 from now on, while the repository stays visible."""
        with self.lock:
            del self._runs[run_id]

    def add_run(self, display_title: str, *, event: str = "workflow_dispatch") -> int:
        """A run buildq did not start (a person, another tool): returns its id."""
        with self.lock:
            return self._new_run(display_title, {}, event).id

    def dispatch_without_run_id(self, count: int = 1) -> None:
        """The next ``count`` dispatches answer 204 even when run details were asked for."""
        with self.lock:
            self._no_details_next += count

    def webhook_payload(
        self, run_id: int, attempt: int | None = None, action: str = "completed"
    ) -> bytes:
        with self.lock:
            run = self._runs[run_id]
            return json.dumps(
                {
                    "action": action,
                    "workflow_run": self._json(run, attempt or len(run.attempts)),
                    "repository": {"full_name": f"{self.owner}/{self.repo}"},
                }
            ).encode()

    def send_webhook(
        self, url: str, secret: str, run_id: int, *, attempt: int | None = None
    ) -> httpx.Response:
        """POST a signed ``workflow_run`` delivery for ``run_id`` to ``url``."""
        body = self.webhook_payload(run_id, attempt)
        headers = {
            "Content-Type": "application/json",
            "X-GitHub-Event": "workflow_run",
            "X-Hub-Signature-256": sign(body, secret),
        }
        return httpx.post(url, content=body, headers=headers, timeout=5)

    # vendor hooks ----------------------------------------------------------------------
    def rate_headers(self, now: float) -> dict[str, str]:
        reset_epoch = time.time() + (self.rate.reset_at - now)
        return {
            "x-ratelimit-limit": str(self.rate.limit),
            "x-ratelimit-remaining": str(max(self.rate.remaining, 0)),
            "x-ratelimit-used": str(self.rate.limit - max(self.rate.remaining, 0)),
            "x-ratelimit-reset": str(int(reset_epoch) + 1),
            "x-ratelimit-resource": "core",
        }

    def rate_limited(self, now: float) -> Reply:
        if self.secondary_limit:
            wait = str(self.rate.reset_in(now))
            body = {"message": "You have exceeded a secondary rate limit."}
            return Reply(403, body, {"retry-after": wait})
        return Reply(429, {"message": "API rate limit exceeded"})

    def etag_304_is_free(self) -> bool:
        return True  # GitHub: an authorized 304 does not count against the primary limit

    def route(self, request: Request) -> Reply:
        repository = f"/repos/{self.owner}/{self.repo}"
        moved = self._moved(request)
        if moved is not None:
            return moved
        if request.path == repository and request.method == "GET":
            return Reply(200, {"full_name": f"{self.owner}/{self.repo}", "private": True})
        if request.path.startswith(repository + "/contents/") and request.method == "GET":
            return self._contents(request.path[len(repository + "/contents/") :])
        prefix = f"{repository}/actions/"
        if not request.path.startswith(prefix):
            return Reply(404, {"message": "Not Found"})
        parts = request.path[len(prefix) :].strip("/").split("/")
        if parts == ["workflows", self.workflow] and request.method == "GET":
            path = f".github/workflows/{self.workflow}"
            return Reply(200, {"id": 161335, "name": "buildq", "path": path, "state": "active"})
        if parts[:1] == ["workflows"] and len(parts) == 3 and parts[1] == self.workflow:
            if parts[2] == "dispatches" and request.method == "POST":
                return self._dispatch(request.body or {})
            if parts[2] == "runs" and request.method == "GET":
                return self._list(request)
        if parts[:1] == ["runs"] and len(parts) >= 2 and parts[1].isdigit():
            run = self._runs.get(int(parts[1]))
            if run is not None:
                return self._run_endpoint(run, parts[2:], request.method)
        return Reply(404, {"message": "Not Found"})

    # endpoints -------------------------------------------------------------------------
    def _moved(self, request: Request) -> Reply | None:
        """A renamed repository: GitHub answers 301 with the new location (307 for writes)."""
        if self.renamed_from is None:
            return None
        old = "/repos/{}/{}".format(*self.renamed_from)
        if request.path != old and not request.path.startswith(old + "/"):
            return None
        query = urlencode(request.query, doseq=True)
        target = f"{self.url}/repos/{self.owner}/{self.repo}{request.path[len(old) :]}"
        status = 301 if request.method == "GET" else 307
        location = target + (f"?{query}" if query else "")
        return Reply(
            status, {"message": "Moved Permanently", "url": location}, {"Location": location}
        )

    def _contents(self, path: str) -> Reply:
        if self.workflow_file is None or path != f".github/workflows/{self.workflow}":
            return Reply(404, {"message": "Not Found"})
        encoded = base64.b64encode(self.workflow_file.encode()).decode()
        return Reply(200, {"type": "file", "path": path, "encoding": "base64", "content": encoded})

    def _dispatch(self, body: dict[str, Any]) -> Reply:
        if "return_run_details" in body and self.run_details == "unsupported":
            return Reply(
                400, {"message": 'Invalid request.\n\n"return_run_details" is not a permitted key.'}
            )
        inputs = body.get("inputs") or {}
        unexpected = sorted(set(inputs) - INPUTS)
        if unexpected or not isinstance(body.get("ref"), str):
            return Reply(422, {"message": f"Unexpected inputs provided: {unexpected}"})
        if len(json.dumps(inputs, separators=(",", ":"))) > MAX_INPUT_CHARS:
            return Reply(422, {"message": "inputs are too large"})
        run = self._new_run(self.run_name(inputs), dict(inputs), "workflow_dispatch")
        run.hidden_for_lists = self.list_lag
        if self.after_dispatch is not None:
            self.after_dispatch(run)
        wants_details = body.get("return_run_details") is True and self.run_details == "supported"
        if not wants_details or self._no_details_next:
            self._no_details_next = max(self._no_details_next - 1, 0)
            return Reply(204)
        return Reply(
            200,
            {
                "workflow_run_id": run.id,
                "run_url": f"{self.url}/repos/{self.owner}/{self.repo}/actions/runs/{run.id}",
                "html_url": self._html_url(run.id),
            },
        )

    def _list(self, request: Request) -> Reply:
        event = request.param("event")
        created = request.param("created") or ""
        since = _parse_iso(created[2:]) if created.startswith(">=") else 0.0
        visible = []
        for run in sorted(self._runs.values(), key=lambda r: -r.id):
            if run.hidden_for_lists > 0:
                run.hidden_for_lists -= 1
                continue
            if (event is None or run.event == event) and run.attempts[0].created_at >= since:
                visible.append(run)
        per_page = int(request.param("per_page", "30") or 30)
        page = int(request.param("page", "1") or 1)
        chunk = visible[(page - 1) * per_page : page * per_page]
        runs = [self._json(r, len(r.attempts)) for r in chunk]
        return Reply(200, {"total_count": len(visible), "workflow_runs": runs})

    def _run_endpoint(self, run: FakeRun, rest: list[str], method: str) -> Reply:
        if not rest and method == "GET":
            return Reply(200, self._json(run, len(run.attempts)), cacheable=True)
        if len(rest) == 2 and rest[0] == "attempts" and rest[1].isdigit() and method == "GET":
            number = int(rest[1])
            if not 1 <= number <= len(run.attempts):
                return Reply(404, {"message": "Not Found"})
            return Reply(200, self._json(run, number), cacheable=True)
        if rest == ["cancel"] and method == "POST":
            latest = run.attempts[-1]
            if latest.status == "completed":
                return Reply(409, {"message": "Cannot cancel a workflow run that is completed."})
            latest.status, latest.conclusion, latest.updated_at = (
                "completed",
                "cancelled",
                time.time(),
            )
            return Reply(202, {})
        return Reply(404, {"message": "Not Found"})

    def _new_run(self, title: str, inputs: dict[str, str], event: str) -> FakeRun:
        self._next_id += 1
        run = FakeRun(self._next_id, title, event, inputs=inputs)
        self._runs[run.id] = run
        return run

    def _html_url(self, run_id: int) -> str:
        return f"{self.url}/{self.owner}/{self.repo}/actions/runs/{run_id}"

    def _json(self, run: FakeRun, attempt: int) -> dict[str, Any]:
        state = run.attempts[attempt - 1]
        return {
            "id": run.id,
            "name": "buildq",
            "display_title": run.display_title,
            "event": run.event,
            "status": state.status,
            "conclusion": state.conclusion,
            "run_attempt": attempt,
            "head_branch": run.head_branch,
            "head_sha": hashlib.sha1(str(run.id).encode()).hexdigest(),
            "html_url": self._html_url(run.id),
            "url": f"{self.url}/repos/{self.owner}/{self.repo}/actions/runs/{run.id}",
            "created_at": iso(run.attempts[0].created_at),
            "run_started_at": iso(state.started_at),
            "updated_at": iso(state.updated_at),
            "path": f".github/workflows/{self.workflow}",
        }


def sign(body: bytes, secret: str) -> str:
    """An ``X-Hub-Signature-256`` value for ``body``, as GitHub computes it."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _parse_iso(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))
