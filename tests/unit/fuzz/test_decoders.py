"""Every decoder of a queue payload or webhook body, fed hostile input.

A decoder either returns a value the rest of buildq can store and show (valid Unicode, within
the columns' widths) or raises its one documented error with a message; nothing else escapes.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildq.buildrunner import BuildID, Change, MalformedPayload, buildkite, github, gitlab
from buildq.buildrunner.registry import MalformedEvent
from buildq.config.base import Secret
from buildq.orchestrator.model import BuildRequest
from buildq.orchestrator.schema import builds
from buildq.webhook import WebhookConfig, WebhookRoute, WebhookServer
from tests.support.strategies import encode, json_values, mutated, nasty_text, raw_bytes

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
QUEUE_WIDTH = builds.c.queue.type.length  # type: ignore[attr-defined]

VALID_REQUEST: dict[str, Any] = {
    "request_id": "req-1",
    "queue": "main",
    "base": [{"id": "b1", "revision": "r"}],
    "head": [{"id": "c1", "revision": "r", "extra": {"k": "v"}}],
    "metadata": {"requester": "ops"},
}


def storable(text: str) -> None:
    """What the database drivers will be given: valid UTF-8."""
    text.encode("utf-8")


def check_request(request: BuildRequest) -> None:
    for text in (request.request_id, request.queue):
        storable(text)
    assert 0 < len(request.request_id) <= 191
    assert 0 < len(request.queue) <= QUEUE_WIDTH, "the builds.queue column must hold it"
    for change in (*request.base, *request.head):
        for text in (change.id, change.revision, *change.extra.keys(), *change.extra.values()):
            storable(text)
    for key, value in request.metadata.items():
        storable(key)
        storable(value)
    assert BuildRequest.from_bytes(request.to_bytes()) == request


def decode_request(raw: bytes) -> None:
    try:
        request = BuildRequest.from_bytes(raw)
    except MalformedPayload as err:
        assert str(err)
        return
    check_request(request)


@FUZZ
@given(raw_bytes)
def test_build_request_from_any_bytes(raw: bytes) -> None:
    decode_request(raw)


@FUZZ
@given(mutated(VALID_REQUEST, list(VALID_REQUEST)))
def test_build_request_with_hostile_fields(doc: dict[str, Any]) -> None:
    decode_request(encode(doc))


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": nasty_text}, optional={"revision": json_values, "extra": json_values}
        ),
        max_size=3,
    ),
    st.dictionaries(nasty_text, json_values, max_size=3),
)
def test_build_request_with_hostile_changes_and_metadata(
    head: list[dict[str, Any]], metadata: dict[str, Any]
) -> None:
    decode_request(encode({**VALID_REQUEST, "head": head, "metadata": metadata}))


@FUZZ
@given(raw_bytes | st.builds(lambda v: encode({"id": v}), json_values))
def test_build_id_from_any_bytes(raw: bytes) -> None:
    try:
        build_id = BuildID.from_bytes(raw)
    except MalformedPayload as err:
        assert str(err)
        return
    storable(build_id.id)
    assert BuildID.from_bytes(build_id.to_bytes()) == build_id


@FUZZ
@given(json_values)
def test_change_from_any_json(value: Any) -> None:
    try:
        change = Change.from_json(value)
    except MalformedPayload as err:
        assert str(err)
        return
    assert Change.from_json(change.to_json()) == change


# --- webhook bodies -----------------------------------------------------------------------

segment = nasty_text | st.sampled_from(["acme", "app", "[", "]", "%zz", "..", "a/b"])
buildkite_urls = st.builds(
    lambda org, pipeline, number: (
        f"https://api.buildkite.com/v2/organizations/{org}/pipelines/{pipeline}/builds/{number}"
    ),
    segment,
    segment,
    st.integers(min_value=-5, max_value=10**6).map(str) | st.sampled_from(["1" * 5000, "١٢"]),
) | st.sampled_from(["http://[::1", "http://[x]/organizations/a/pipelines/b/builds/1", "::::"])
buildkite_events = st.fixed_dictionaries(
    {"build": st.fixed_dictionaries({"url": buildkite_urls | json_values}) | json_values}
) | st.dictionaries(nasty_text, json_values, max_size=3)
github_events = st.fixed_dictionaries(
    {
        "workflow_run": st.fixed_dictionaries({"id": json_values, "run_attempt": json_values})
        | json_values,
        "repository": st.fixed_dictionaries({"full_name": json_values}) | json_values,
    }
) | st.dictionaries(nasty_text, json_values, max_size=3)
gitlab_events = st.fixed_dictionaries(
    {
        "object_kind": st.sampled_from(["pipeline", "build", "push"]) | json_values,
        "object_attributes": st.fixed_dictionaries({"id": json_values}) | json_values,
        "project": st.fixed_dictionaries({"id": json_values}) | json_values,
    }
) | st.dictionaries(nasty_text, json_values, max_size=3)


def check_event_build_id(found: BuildID | None) -> None:
    if found is not None:
        storable(found.id)


@FUZZ
@given(buildkite_events)
def test_buildkite_event_decoder(payload: dict[str, Any]) -> None:
    check_event_build_id(buildkite.build_id_from_event(payload))


@FUZZ
@given(github_events)
def test_github_event_decoder(payload: dict[str, Any]) -> None:
    check_event_build_id(github.build_id_from_event(payload))


@FUZZ
@given(gitlab_events)
def test_gitlab_event_decoder(payload: dict[str, Any]) -> None:
    try:
        found = gitlab.build_id_from_event({"x-gitlab-event": "Pipeline Hook"}, payload)
    except MalformedEvent as err:  # its one documented error: a pipeline event without ids
        assert str(err)
        return
    check_event_build_id(found)


SECRET = "fuzz-webhook-secret"


def signed(kind: str, body: bytes) -> dict[str, str]:
    if kind == buildkite.KIND:
        stamp = str(int(time.time()))
        digest = hmac.new(SECRET.encode(), stamp.encode() + b"." + body, hashlib.sha256)
        return {
            "x-buildkite-event": "build.finished",
            "x-buildkite-signature": f"timestamp={stamp},signature={digest.hexdigest()}",
        }
    if kind == gitlab.KIND:
        return {"x-gitlab-event": "Pipeline Hook", "x-gitlab-token": SECRET}
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256)
    return {"x-github-event": "workflow_run", "x-hub-signature-256": "sha256=" + digest.hexdigest()}


@FUZZ
@given(
    st.sampled_from([buildkite.KIND, github.KIND, gitlab.KIND]),
    raw_bytes
    | buildkite_events.map(encode)
    | github_events.map(encode)
    | gitlab_events.map(encode),
    st.booleans(),
)
def test_webhook_receiver_answers_every_body(kind: str, body: bytes, sign: bool) -> None:
    """Signed or not, any body gets an answer (never an exception); only BuildIDs get through."""
    seen: list[BuildID] = []
    server = WebhookServer(
        WebhookConfig(enabled=True),
        [WebhookRoute("ci", kind, Secret(SECRET, "env:FUZZ"))],
        lambda _runner, build_id: seen.append(build_id),
    )
    route = server.route("/webhooks/ci")
    assert route is not None
    headers = signed(kind, body) if sign else {"x-github-event": "workflow_run"}
    outcome = server.handle(route, headers, body)
    if not sign:
        assert outcome.status == 401
    assert outcome.status in (200, 202, 400, 401), outcome
    assert len(seen) == (1 if outcome.status == 202 else 0)
    for build_id in seen:
        storable(build_id.id)
