"""The GitLab and Jenkins fakes driven by independent, published clients: python-gitlab and
python-jenkins.

Our runners are tested against these fakes (test_gitlab.py, test_jenkins.py, the conformance
suite, the end-to-end tests), so a fake that spoke a dialect of its own would let a runner pass
against a service that does not exist. Here a client nobody at buildq wrote performs the same
operations as the runner (create, look up, read, cancel, trigger, crumbs, auth) and each test
compares what the fake recorded from the client with what it recorded from our runner: the
same path and method, the same body (or the same parameters where the client puts them
elsewhere), the same credential, and the response fields the runner reads, as the client
exposes them. Where a client and a fake disagreed, the services' documentation decided; see
docs/ci-runners.md, "Testing against fakes".
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import gitlab
import jenkins
import pytest
from gitlab.v4.objects import ProjectPipelineManager

from buildq.buildrunner._http_runner import changes_json
from buildq.buildrunner.contract import CORRELATION_KEY, BuildStatus, Change
from buildq.buildrunner.gitlab import GitLabRunner
from buildq.buildrunner.jenkins import JenkinsRunner
from tests.integration.runners.conftest import GL_TRIGGER_ENV, pipeline_id, queue_id
from tests.support.fakeci import Request
from tests.support.fakeci.gitlab import FakeGitLab
from tests.support.fakeci.jenkins import CRUMB, CRUMB_FIELD, FakeJenkins

MakeGitLabRunner = Callable[..., GitLabRunner]
MakeJenkinsRunner = Callable[..., JenkinsRunner]
HEAD = [Change("change-1", "abc123")]
#: What every runner reads off a pipeline (buildq.buildrunner.gitlab: create, lookup, status).
PIPELINE_FIELDS = (
    "id",
    "project_id",
    "name",
    "status",
    "ref",
    "sha",
    "source",
    "web_url",
    "started_at",
    "finished_at",
)


def variables_of(request_id: str) -> dict[str, str]:
    """The variables a trigger sends (docs/ci-runners.md), for a request id of the test's."""
    return {
        "BUILDQ_QUEUE": "main",
        "BUILDQ_BASE": changes_json([]),
        "BUILDQ_HEAD": changes_json(HEAD),
        "BUILDQ_REQUEST_ID": request_id,
    }


def with_request_id(body: Any, ours: str, theirs: str) -> Any:
    """``body`` with one request id swapped for another: the rest must be equal."""
    return json.loads(json.dumps(body).replace(ours, theirs))


def only(requests: list[Request]) -> Request:
    assert len(requests) == 1, [(r.method, r.path, r.status) for r in requests]
    return requests[0]


def flat(query: dict[str, list[str]]) -> dict[str, str]:
    return {k: v[0] for k, v in query.items()}


# --- GitLab through python-gitlab -----------------------------------------------------------


@pytest.fixture
def gitlab_client(gl: FakeGitLab) -> Iterator[gitlab.Gitlab]:
    """python-gitlab as its docs set it up for a personal access token (``PRIVATE-TOKEN``)."""
    with gitlab.Gitlab(gl.url, private_token=gl.token) as client:
        yield client


def test_gitlab_pipelines_create_sends_the_runners_request_and_answers_what_it_reads(
    gl: FakeGitLab, make_gl_runner: MakeGitLabRunner, gitlab_client: gitlab.Gitlab
) -> None:
    make_gl_runner(lookup_before_trigger=False).trigger(
        "main", [], HEAD, {CORRELATION_KEY: "req-runner"}
    )
    ours = only(gl.requests_matching("POST", "/pipeline"))

    # The project by its path, as the runner is configured; python-gitlab encodes it.
    project = gitlab_client.projects.get(gl.project_path, lazy=True)
    variables = [
        {"key": k, "value": v, "variable_type": "env_var"}
        for k, v in variables_of("req-client").items()
    ]
    created = project.pipelines.create({"ref": "main", "variables": variables})
    theirs = gl.requests_matching("POST", "/pipeline")[-1]

    assert (theirs.method, theirs.path, theirs.status) == (ours.method, ours.path, 201)
    assert theirs.path == "/api/v4/projects/acme%2Fapp/pipeline"
    assert theirs.headers["content-type"] == ours.headers["content-type"] == "application/json"
    assert theirs.body == with_request_id(ours.body, "req-runner", "req-client")
    assert all(field in created.attributes for field in PIPELINE_FIELDS)
    assert (created.project_id, created.ref, created.source, created.status) == (
        gl.project_id,
        "main",
        "api",
        "created",
    )
    assert created.name == "buildq req-client"  # workflow:name, what a lost create is found by
    listed = created.variables.list(get_all=True)
    assert [(v.key, v.value, v.variable_type) for v in listed] == [
        (v["key"], v["value"], v["variable_type"]) for v in variables
    ]


def test_gitlab_lookup_by_name_is_a_python_gitlab_list_with_the_same_filters(
    gl: FakeGitLab, make_gl_runner: MakeGitLabRunner, gitlab_client: gitlab.Gitlab
) -> None:
    # A trigger with a request id looks for an earlier pipeline of that name first.
    build_id = make_gl_runner().trigger("main", [], HEAD, {CORRELATION_KEY: "req-find"})
    ours = only([r for r in gl.requests_matching("GET", "/pipelines") if r.param("name")])
    filters = flat(ours.query)
    assert filters["name"] == "buildq req-find" and filters["ref"] == "main"

    project = gitlab_client.projects.get(gl.project_path, lazy=True)
    found = project.pipelines.list(get_all=False, **filters)
    theirs = gl.requests_matching("GET", "/pipelines")[-1]
    assert (theirs.path, theirs.query) == (ours.path, ours.query)
    assert [p.id for p in found] == [pipeline_id(build_id)]
    assert all(field in found[0].attributes for field in PIPELINE_FIELDS if "_at" not in field)

    # python-gitlab declares the list filters GitLab documents, except ``updated_after``
    # (GitLab's Pipelines API has it; python-gitlab passes it through undeclared).
    declared = set(ProjectPipelineManager._list_filters) | {"per_page", "page"}
    assert set(filters) - declared <= {"updated_after"}


def test_gitlab_lists_page_the_way_python_gitlab_follows(
    gl: FakeGitLab, gitlab_client: gitlab.Gitlab
) -> None:
    project = gitlab_client.projects.get(gl.project_id, lazy=True)
    made = [
        project.pipelines.create({"ref": "main", "variables": []}).id,
        project.pipelines.create({"ref": "other", "variables": []}).id,
        project.pipelines.create({"ref": "main", "variables": []}).id,
        project.pipelines.create({"ref": "main", "variables": []}).id,
    ]
    everything = project.pipelines.list(get_all=True, per_page=2, ref="main", sort="asc")
    assert [p.id for p in everything] == [made[0], made[2], made[3]]
    first, second = gl.requests_matching("GET", "/pipelines")
    # python-gitlab followed the Link header: page 2 keeps the filters.
    assert flat(second.query) == {"ref": "main", "sort": "asc", "page": "2", "per_page": "2"}
    pages = project.pipelines.list(iterator=True, per_page=2, ref="main")
    assert (pages.total, pages.total_pages, pages.per_page, pages.next_page) == (3, 2, 2, 2)
    assert first.status == second.status == 200


def test_gitlab_get_and_cancel_are_the_runners_requests(
    gl: FakeGitLab, make_gl_runner: MakeGitLabRunner, gitlab_client: gitlab.Gitlab
) -> None:
    runner = make_gl_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-cancel"})
    number = pipeline_id(build_id)
    gl.set_status(number, "running")

    # The build id names the project by number: so does the client here.
    project = gitlab_client.projects.get(gl.project_id, lazy=True)
    pipeline = project.pipelines.get(number)
    assert pipeline.status == "running" and pipeline.started_at
    answer = pipeline.cancel()
    assert isinstance(answer, dict) and answer["status"] == "canceled"  # the pipeline, 200
    pipeline.refresh()
    assert pipeline.status == "canceled" and pipeline.finished_at
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED
    reads = gl.requests_matching("GET", f"/pipelines/{number}")
    theirs_get, ours_get = reads[0], reads[-1]
    theirs_cancel = only(gl.requests_matching("POST", "/cancel"))

    gl.set_status(number, "running")  # again, for the runner to cancel
    runner.cancel(build_id)
    ours_cancel = gl.requests_matching("POST", "/cancel")[-1]
    assert (
        ours_get.path == theirs_get.path == f"/api/v4/projects/{gl.project_id}/pipelines/{number}"
    )
    assert ours_cancel.path == theirs_cancel.path
    # Cancel takes no parameters: the runner sends no body, python-gitlab an empty object.
    assert (ours_cancel.body, theirs_cancel.body) == (None, {})
    assert ours_cancel.status == theirs_cancel.status == 200
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED


def test_gitlab_trigger_pipeline_sends_the_runners_body_with_the_trigger_token_alone(
    gl: FakeGitLab, make_gl_runner: MakeGitLabRunner
) -> None:
    runner = make_gl_runner(trigger_token_env=GL_TRIGGER_ENV, lookup_before_trigger=False)
    runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-runner"})
    ours = only(gl.requests_matching("POST", "/trigger/pipeline"))

    # No access token: a trigger token is a credential of its own (GitLab's triggers API).
    with gitlab.Gitlab(gl.url) as anonymous:
        project = anonymous.projects.get(gl.project_path, lazy=True)
        pipeline = project.trigger_pipeline(
            "main", gl.trigger_token, variables=variables_of("req-client")
        )
        theirs = gl.requests_matching("POST", "/trigger/pipeline")[-1]
        with pytest.raises(gitlab.GitlabCreateError) as wrong:
            project.trigger_pipeline("main", "glptt-wrong", variables={})
    assert wrong.value.response_code == 404
    assert "authorization" not in theirs.headers and "private-token" not in theirs.headers
    assert (
        (theirs.path, theirs.status)
        == (ours.path, ours.status)
        == (
            "/api/v4/projects/acme%2Fapp/trigger/pipeline",
            201,
        )
    )
    # python-gitlab always sends ``inputs`` (optional, none here); the rest is the same body.
    assert theirs.body.pop("inputs") == {}
    assert theirs.body == with_request_id(ours.body, "req-runner", "req-client")
    assert (pipeline.source, pipeline.name) == ("trigger", "buildq req-client")
    assert all(field in pipeline.attributes for field in PIPELINE_FIELDS)


def test_gitlab_access_tokens_as_python_gitlab_and_the_runner_send_them(
    gl: FakeGitLab, make_gl_runner: MakeGitLabRunner, gitlab_client: gitlab.Gitlab
) -> None:
    build_id = make_gl_runner().trigger("main", [], HEAD, {CORRELATION_KEY: "req-auth"})
    ours = only(gl.requests_matching("POST", "/pipeline"))
    assert ours.headers["authorization"] == f"Bearer {gl.token}"

    gitlab_client.projects.get(gl.project_id, lazy=True).pipelines.get(pipeline_id(build_id))
    assert gl.requests[-1].headers["private-token"] == gl.token and gl.requests[-1].status == 200
    # An OAuth-style bearer token is what the runner sends: python-gitlab's spelling is equal.
    with gitlab.Gitlab(gl.url, oauth_token=gl.token) as bearer:
        bearer.projects.get(gl.project_id, lazy=True).pipelines.get(pipeline_id(build_id))
    assert gl.requests[-1].headers["authorization"] == ours.headers["authorization"]
    for wrong in ({"private_token": "glpat-wrong"}, {"oauth_token": "glpat-wrong"}):
        with gitlab.Gitlab(gl.url, **wrong) as refused:
            project = refused.projects.get(gl.project_id, lazy=True)
            with pytest.raises(gitlab.GitlabAuthenticationError) as denied:
                project.pipelines.get(pipeline_id(build_id))
        assert denied.value.response_code == 401


# --- Jenkins through python-jenkins ---------------------------------------------------------


@pytest.fixture
def jenkins_client(jk: FakeJenkins) -> Iterator[jenkins.Jenkins]:
    """python-jenkins with a user and that user's API token (HTTP basic)."""
    client = jenkins.Jenkins(jk.url, username=jk.user, password=jk.token, timeout=5)
    yield client
    client._session.close()


def test_jenkins_build_job_queues_what_the_runner_queues(
    jk: FakeJenkins, make_jk_runner: MakeJenkinsRunner, jenkins_client: jenkins.Jenkins
) -> None:
    build_id = make_jk_runner().trigger("main", [], HEAD, {CORRELATION_KEY: "req-runner"})
    ours = only(jk.requests_matching("POST", "/buildWithParameters"))
    ours_lookup = only(jk.requests_matching("GET", "/queue/api/json"))

    parameters = variables_of("req-client")
    number = jenkins_client.build_job(jk.job, parameters)  # the queue item, from Location
    theirs = jk.requests_matching("POST", "/buildWithParameters")[-1]
    assert (
        (theirs.path, theirs.status)
        == (ours.path, ours.status)
        == (
            "/job/folder/job/app-merge/buildWithParameters",
            201,
        )
    )
    # python-jenkins puts the parameters in the query string, the runner in a form body:
    # Jenkins reads both, and so the same parameters reach the queue.
    assert (flat(theirs.query), theirs.body) == (parameters, None)
    assert (ours.query, ours.body) == ({}, variables_of("req-runner"))
    assert theirs.headers["authorization"] == ours.headers["authorization"]
    assert {i.id: i.parameters for i in jk.items()} == {
        queue_id(build_id): variables_of("req-runner"),
        number: parameters,
    }
    # Jenkins merges a request with the parameters of an item still waiting into that item:
    # the request id in every trigger is what keeps two of buildq's triggers apart.
    assert jenkins_client.build_job(jk.job, variables_of("req-runner")) == queue_id(build_id)

    # The queue as python-jenkins reads it (the runner's lookup reads the same path).
    queued = {item["id"]: item for item in jenkins_client.get_queue_info()}
    assert ours_lookup.path == jk.requests_matching("GET", "/queue/api/json")[-1].path
    assert set(queued) == {queue_id(build_id), number}
    assert queued[number]["task"]["url"].endswith("/job/folder/job/app-merge/")
    [action] = [a for a in queued[number]["actions"] if "parameters" in a]
    assert {p["name"]: p["value"] for p in action["parameters"]} == parameters


def test_jenkins_queue_item_build_info_and_stop_are_the_runners_requests(
    jk: FakeJenkins, make_jk_runner: MakeJenkinsRunner, jenkins_client: jenkins.Jenkins
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-1"})
    item_id = queue_id(build_id)

    waiting = jenkins_client.get_queue_item(item_id)
    assert waiting["why"] and "executable" not in waiting and "cancelled" not in waiting
    assert runner.status(build_id)[0] is BuildStatus.ACCEPTED
    theirs_item, ours_item = jk.requests_matching("GET", f"/queue/item/{item_id}/")[-2:]
    assert theirs_item.path == ours_item.path == f"/queue/item/{item_id}/api/json"

    number = jk.start_build(item_id)
    left = jenkins_client.get_queue_item(item_id)
    assert left["executable"]["number"] == number and left["cancelled"] is False
    info = jenkins_client.get_build_info(jk.job, number)
    assert (info["number"], info["queueId"], info["building"], info["result"]) == (
        number,
        item_id,
        True,
        None,
    )
    assert info["url"].endswith(f"/job/folder/job/app-merge/{number}/") and info["timestamp"]
    [action] = [a for a in info["actions"] if "parameters" in a]
    assert {p["name"]: p["value"] for p in action["parameters"]}["BUILDQ_REQUEST_ID"] == "req-1"
    assert runner.status(build_id)[0] is BuildStatus.RUNNING
    theirs_build, ours_build = jk.requests_matching("GET", f"/{number}/api/json")[-2:]
    assert theirs_build.path == ours_build.path == f"/job/folder/job/app-merge/{number}/api/json"

    # stop answers with a redirect to the build's page, which python-jenkins follows.
    jenkins_client.stop_build(jk.job, number)
    theirs_stop, page = jk.requests[-2:]
    assert (theirs_stop.path, theirs_stop.status) == (
        f"/job/folder/job/app-merge/{number}/stop",
        302,
    )
    assert (page.method, page.path, page.status) == (
        "GET",
        f"/job/folder/job/app-merge/{number}/",
        200,
    )
    info = jenkins_client.get_build_info(jk.job, number)
    assert (info["building"], info["result"]) == (False, "ABORTED")
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED

    # The runner stops a running build with the same request (and follows the same redirect).
    other = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-2"})
    second = jk.start_build(queue_id(other))
    runner.cancel(other)
    ours_stop, ours_page = jk.requests[-2:]
    assert ours_stop.path == theirs_stop.path.replace(f"/{number}/", f"/{second}/")
    assert (ours_stop.status, ours_page.status) == (302, 200)


def test_jenkins_cancel_queue_is_the_runners_request_and_left_items_are_refused(
    jk: FakeJenkins, make_jk_runner: MakeJenkinsRunner, jenkins_client: jenkins.Jenkins
) -> None:
    runner = make_jk_runner()
    build_id = runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-runner"})
    runner.cancel(build_id)
    ours = only(jk.requests_matching("POST", "/queue/cancelItem"))

    number = jenkins_client.build_job(jk.job, variables_of("req-client"))
    jenkins_client.cancel_queue(number)
    theirs = jk.requests_matching("POST", "/queue/cancelItem")[-1]
    assert (theirs.path, theirs.status) == (ours.path, ours.status) == ("/queue/cancelItem", 204)
    assert (flat(theirs.query), flat(ours.query)) == (
        {"id": str(number)},
        {"id": str(queue_id(build_id))},
    )
    assert jenkins_client.get_queue_item(number)["cancelled"] is True
    assert runner.status(build_id)[0] is BuildStatus.CANCELLED

    # An item that left the queue cannot be cancelled: Jenkins answers 500 "Could not cancel",
    # which python-jenkins raises; once Jenkins forgot the item, 404, which it takes as done.
    started = jenkins_client.build_job(jk.job, variables_of("req-started"))
    jk.start_build(started)
    with pytest.raises(jenkins.JenkinsException, match=r"\[500\]"):
        jenkins_client.cancel_queue(started)
    jk.forget(started)
    jenkins_client.cancel_queue(started)
    assert jk.requests[-1].status == 404


def test_jenkins_crumb_and_api_token_as_python_jenkins_sends_them(
    make_jk_runner: MakeJenkinsRunner,
) -> None:
    with FakeJenkins(require_crumb=True) as strict:
        client = jenkins.Jenkins(strict.url, username=strict.user, password=strict.token)
        try:
            number = client.build_job(strict.job, variables_of("req-client"))
            client.cancel_queue(number)
        finally:
            client._session.close()
        # python-jenkins asks crumbIssuer/api/json first and is never refused.
        crumb_get = only(strict.requests_matching("GET", "/crumbIssuer"))
        assert (crumb_get.path, crumb_get.status) == ("/crumbIssuer/api/json", 200)
        theirs = strict.requests_matching("POST")
        assert [r.status for r in theirs] == [201, 204]
        assert all(r.headers[CRUMB_FIELD.lower()] == CRUMB for r in theirs)

        # The runner asks the same issuer on its first 403 and names the same header.
        runner = make_jk_runner(api_url=strict.url)
        runner.trigger("main", [], HEAD, {CORRELATION_KEY: "req-runner"})
        crumb_gets = strict.requests_matching("GET", "/crumbIssuer")
        assert [r.path for r in crumb_gets] == [crumb_get.path] * 2
        refused, ours = strict.requests_matching("POST")[2:]
        assert (refused.status, ours.status, ours.headers[CRUMB_FIELD.lower()]) == (403, 201, CRUMB)
        assert ours.headers["authorization"] == theirs[0].headers["authorization"]

        wrong = jenkins.Jenkins(strict.url, username=strict.user, password="11wrongSECRETtoken")
        try:
            with pytest.raises(jenkins.JenkinsException, match=r"\[401\]"):
                wrong.get_queue_info()
        finally:
            wrong._session.close()
