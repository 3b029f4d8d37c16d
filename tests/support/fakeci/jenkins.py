"""A fake Jenkins (remote access API: the queue and job endpoints buildq uses) on 127.0.0.1.

Written from Jenkins' "Remote access API" documentation and its source (``Queue.doCancelItem``,
``WorkflowRun.doStop``, ``ParametersDefinitionProperty``); python-jenkins drives it in
tests/integration/runners/test_fakes_match_clients.py (``BUILD_WITH_PARAMS_JOB``
``job/<name>/buildWithParameters`` answering with the queue item in ``Location``; ``Q_ITEM``
``queue/item/<n>/api/json``; ``Q_INFO``; ``CANCEL_QUEUE`` ``queue/cancelItem?id=<n>``;
``BUILD_INFO``; ``STOP_BUILD`` ``job/<name>/<n>/stop``; ``CRUMB_URL`` ``crumbIssuer/api/json``
with ``crumb`` and ``crumbRequestField``; folders as ``job/<folder>/job/<name>``).
Authentication is HTTP basic with a user's API token.

The job's ``api/json`` (without ``tree``) also shows ``concurrentBuild`` and its ``property``
list, as a Pipeline job does (``disable_concurrent_builds``).

Like Jenkins, ``buildWithParameters`` reads the parameters from the query string and the form
body alike; a request whose parameters equal those of an item still waiting in the queue is
merged into it; ``queue/cancelItem`` answers 204 for a waiting item, 500 "Could not cancel"
for one that already left the queue (its build started, or it was cancelled) and 404 once the
item is forgotten; ``stop`` redirects to the ``Referer`` or else the build's page, which is
served; and a queue item is forgotten some time after its build started (``forget``). Only an
item that left the queue carries ``cancelled`` and ``executable``. Builds move only when told
(``start_build``, ``finish``).
"""

from __future__ import annotations

import base64
import itertools
import re
import time
from dataclasses import dataclass, field
from typing import Any

from ._server import FakeService, Reply, Request

USER = "buildq-bot"
TOKEN = "11fakejenkinsapitokenSECRET0123"
CRUMB = "fake-crumb-0123456789abcdef"
CRUMB_FIELD = "Jenkins-Crumb"
RESULTS = frozenset({"SUCCESS", "UNSTABLE", "FAILURE", "NOT_BUILT", "ABORTED"})
DISABLE_CONCURRENT = (
    "org.jenkinsci.plugins.workflow.job.properties.DisableConcurrentBuildsJobProperty"
)
_RANGE = re.compile(r"\{(\d+),(\d+)\}\s*$")


@dataclass
class QueueItem:
    id: int
    job: str
    parameters: dict[str, str]
    cancelled: bool = False
    number: int | None = None
    forgotten: bool = False


@dataclass
class FakeBuild:
    job: str
    number: int
    queue_id: int
    parameters: dict[str, str]
    result: str | None = None
    started_ms: int = field(default_factory=lambda: int(time.time() * 1000))
    duration_ms: int = 0


class FakeJenkins(FakeService):
    def __init__(
        self,
        *,
        job: str = "folder/app-merge",
        user: str = USER,
        token: str = TOKEN,
        require_crumb: bool = False,
        rate_limit: int = 100_000,
    ) -> None:
        super().__init__(token=token, rate_limit=rate_limit, window_s=60.0)
        self.job = job
        self.user = user
        self.require_crumb = require_crumb
        self._items: dict[int, QueueItem] = {}
        self._builds: dict[int, FakeBuild] = {}
        self._ids = itertools.count(501)
        #: What the job's api/json shows (None: leave the field out).
        self.job_properties: list[dict[str, Any]] | None = []
        self.concurrent_build: bool | None = True
        #: False plays a user who lost Job/Read: Jenkins answers 404 for the job and its builds.
        self.job_readable = True

    # test commands ---------------------------------------------------------------------
    def items(self) -> list[QueueItem]:
        with self.lock:
            return sorted(self._items.values(), key=lambda i: i.id)

    def builds(self) -> list[FakeBuild]:
        with self.lock:
            return sorted(self._builds.values(), key=lambda b: b.number)

    def start_build(self, queue_id: int) -> int:
        """The queue item's build starts; returns its number."""
        with self.lock:
            item = self._items[queue_id]
            number = 1 + max(self._builds, default=0)
            self._builds[number] = FakeBuild(item.job, number, item.id, dict(item.parameters))
            item.number = number
            return number

    def finish(self, number: int, result: str) -> None:
        assert result in RESULTS, result
        with self.lock:
            build = self._builds[number]
            build.result = result
            build.duration_ms = max(int(time.time() * 1000) - build.started_ms, 1)

    def disable_concurrent_builds(self, *, abort_previous: bool) -> None:
        """``options { disableConcurrentBuilds(abortPrevious: …) }``: the property is listed
        without its field (not exported) and ``concurrentBuild`` is true only with
        abortPrevious (workflow-job's ``WorkflowJob.isConcurrentBuild``)."""
        with self.lock:
            self.job_properties = [{"_class": DISABLE_CONCURRENT}]
            self.concurrent_build = abort_previous

    def forget(self, queue_id: int) -> None:
        """Jenkins drops a started item from the queue's memory (minutes after it started)."""
        with self.lock:
            self._items[queue_id].forgotten = True

    # vendor hooks ----------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        pair = base64.b64encode(f"{self.user}:{self.token}".encode()).decode()
        return request.headers.get("authorization") == f"Basic {pair}"

    def rate_headers(self, now: float) -> dict[str, str]:
        return {}

    def rate_limited(self, now: float) -> Reply:
        # Jenkins itself has no limit; a proxy in front of it answers like this.
        return Reply(429, "<html>Too Many Requests</html>", {"Retry-After": "1"})

    def route(self, request: Request) -> Reply:
        path, method = request.path.rstrip("/"), request.method
        if (
            method == "POST"
            and self.require_crumb
            and request.headers.get(CRUMB_FIELD.lower()) != CRUMB
        ):
            return Reply(
                403,
                "<html><body>Error 403 No valid crumb was included in the request</body></html>",
            )
        if path == "/crumbIssuer/api/json" and method == "GET":
            return Reply(200, {"crumb": CRUMB, "crumbRequestField": CRUMB_FIELD})
        if path == "/queue/api/json" and method == "GET":
            waiting = [i for i in self._items.values() if i.number is None and not i.cancelled]
            return Reply(200, {"items": [self._item_json(i) for i in waiting]})
        if path == "/queue/cancelItem" and method == "POST":
            return self._cancel_item(request.param("id", "") or "")
        match = re.fullmatch(r"/queue/item/(\d+)/api/json", path)
        if match and method == "GET":
            item = self._items.get(int(match[1]))
            if item is None or item.forgotten:
                return Reply(404, "<html>Not Found</html>")
            return Reply(200, self._item_json(item))
        return self._job_route(request, path, method)

    def _job_route(self, request: Request, path: str, method: str) -> Reply:
        prefix = "".join(f"/job/{part}" for part in self.job.split("/"))
        if not path.startswith(prefix) or not self.job_readable:
            return Reply(404, "<html>Not Found</html>")
        rest = path[len(prefix) :]
        if rest == "/buildWithParameters" and method == "POST":
            # Jenkins reads request parameters: the query string's and the form's alike.
            form = request.body if isinstance(request.body, dict) else {}
            return self._build_with_parameters({k: v[0] for k, v in request.query.items()} | form)
        if rest == "/api/json" and method == "GET":
            return self._job_json(request.param("tree", "") or "")
        match = re.fullmatch(r"/(\d+)(/api/json|/stop|)", rest)
        build = self._builds.get(int(match[1])) if match else None
        if match is None or build is None:
            return Reply(404, "<html>Not Found</html>")
        if match[2] == "/api/json" and method == "GET":
            return Reply(200, self._build_json(build), cacheable=True)
        if match[2] == "" and method == "GET":  # the build's page, where a stop redirects to
            return Reply(200, f"<html><title>{build.job} #{build.number}</title></html>")
        if match[2] == "/stop" and method == "POST":
            if build.result is None:
                self.finish(build.number, "ABORTED")
            # Stapler's forwardToPreviousPage: back to the Referer, else "." (the build's page).
            location = request.headers.get("referer") or self._build_url(build)
            return Reply(302, None, {"Location": location})
        return Reply(405, "<html>Method Not Allowed</html>")

    # endpoints -------------------------------------------------------------------------
    def _build_with_parameters(self, form: Any) -> Reply:
        if not isinstance(form, dict) or "BUILDQ_REQUEST_ID" not in form:
            # An unparameterised job (or a parameter it does not define) is a 400 "not parameterized".
            return Reply(400, "<html>Nothing is submitted</html>")
        for item in self._items.values():
            if item.number is None and not item.cancelled and item.parameters == form:
                return Reply(201, None, {"Location": f"{self.url}/queue/item/{item.id}/"})
        item = QueueItem(next(self._ids), self.job, dict(form))
        self._items[item.id] = item
        return Reply(201, None, {"Location": f"{self.url}/queue/item/{item.id}/"})

    def _cancel_item(self, raw_id: str) -> Reply:
        item = self._items.get(int(raw_id)) if raw_id.isdigit() else None
        if item is None or item.forgotten:
            return Reply(404, f"<html>Provided id ({raw_id}) not found</html>")
        if item.number is not None or item.cancelled:
            # A LeftItem cannot be cancelled: Queue.cancel(item) is false, and Jenkins says so.
            return Reply(500, f"<html>Could not cancel run for id {raw_id}</html>")
        item.cancelled = True
        return Reply(204)

    def _job_json(self, tree: str) -> Reply:
        builds = sorted(self._builds.values(), key=lambda b: -b.number)
        window = _RANGE.search(tree)
        if window:
            builds = builds[int(window[1]) : int(window[2])]
        body: dict[str, Any] = {
            "name": self.job.rsplit("/", 1)[-1],
            "builds": [self._build_json(b) for b in builds],
        }
        if not tree:  # a tree names the fields it wants; without one the job shows its own
            body["fullName"] = self.job
            if self.concurrent_build is not None:
                body["concurrentBuild"] = self.concurrent_build
            if self.job_properties is not None:
                body["property"] = list(self.job_properties)
        return Reply(200, body)

    def _parameters_action(self, parameters: dict[str, str]) -> list[dict[str, Any]]:
        return [
            {
                "_class": "hudson.model.ParametersAction",
                "parameters": [
                    {"_class": "hudson.model.StringParameterValue", "name": k, "value": v}
                    for k, v in parameters.items()
                ],
            },
            {"_class": "hudson.model.CauseAction", "causes": [{"userId": self.user}]},
        ]

    def _item_json(self, item: QueueItem) -> dict[str, Any]:
        task_url = self.url + "".join(f"/job/{part}" for part in item.job.split("/")) + "/"
        executable = None
        if item.number is not None:
            executable = {"number": item.number, "url": self._build_url(self._builds[item.number])}
        left = item.cancelled or item.number is not None
        common = {
            "id": item.id,
            "actions": self._parameters_action(item.parameters),
            "task": {"name": item.job.rsplit("/", 1)[-1], "url": task_url},
        }
        if not left:
            return {
                "_class": "hudson.model.Queue$WaitingItem",
                **common,
                "why": "Waiting for next available executor",
            }
        # Only a LeftItem exports ``cancelled`` and ``executable``.
        return {
            "_class": "hudson.model.Queue$LeftItem",
            **common,
            "why": None,
            "cancelled": item.cancelled,
            "executable": executable,
        }

    def _build_url(self, build: FakeBuild) -> str:
        return self.url + "".join(f"/job/{p}" for p in build.job.split("/")) + f"/{build.number}/"

    def _build_json(self, build: FakeBuild) -> dict[str, Any]:
        return {
            "_class": "org.jenkinsci.plugins.workflow.job.WorkflowRun",
            "number": build.number,
            "url": self._build_url(build),
            "building": build.result is None,
            "inProgress": build.result is None,
            "result": build.result,
            "timestamp": build.started_ms,
            "duration": build.duration_ms,
            "queueId": build.queue_id,
            "actions": self._parameters_action(build.parameters),
        }
