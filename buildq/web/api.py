"""``/api/…``: the pages' data as JSON, in the shapes of the CLI's ``--json``.

| path | same as |
|---|---|
| ``GET /api/overview`` | (the overview page; documented in docs/web.md) |
| ``GET /api/builds?status=&queue=&limit=`` | ``buildq builds ls --json`` |
| ``GET /api/results?queue=&status=&reason=&q=&before=`` | ``builds ls --json`` rows, finished only |
| ``GET /api/build?id=`` | ``buildq builds show ID --json`` |
| ``GET /api/build/timeline?id=`` | (the build page's timeline) |
| ``GET /api/queue/topics`` | ``buildq queue topics --json`` |
| ``GET /api/queue/lag?topic=`` | ``buildq queue lag --topic T --json`` |
| ``GET /api/queue/leases?topic=&group=`` | ``buildq queue leases --json`` |
| ``GET /api/dlq?topic=&error_contains=&limit=`` | ``buildq dlq ls --topic T --json`` |
| ``POST /api/cancel?id=`` | ``buildq cancel ID`` |
| ``POST /api/dlq/requeue?topic=&id=&partition=&group=`` (or ``&all=1``) | ``buildq dlq requeue --json`` |
| ``POST /api/dlq/purge?…`` (same) | ``buildq dlq purge --json`` |

POSTs need ``Authorization: Bearer <token>``; a browser never sends that by itself, so no
CSRF token is needed here, and a cookie is not accepted.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.queue.sql.admin import DeadLetterFilter, original_topic
from buildq.web import actions, views
from buildq.web.overview import Overview
from buildq.web.pages import build_filter
from buildq.web.state import client, state

STATUSES = {s.value for s in BuildStatus}
MAX_LIMIT = 1000


class JsonResponse(Response):
    """JSON as the CLI prints it: sorted keys, UTF-8, anything else as ``str``."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return json.dumps(content, sort_keys=True, ensure_ascii=False, default=str).encode()


def error(status: int, message: str) -> JsonResponse:
    return JsonResponse({"error": message}, status_code=status)


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit", "")
    return min(int(raw), MAX_LIMIT) if raw.isdigit() and int(raw) > 0 else default


def overview(request: Request) -> Response:
    st = state(request)
    return JsonResponse(Overview(st.db, st.config, st.lateness).read())


def builds(request: Request) -> Response:
    statuses = request.query_params.getlist("status")
    if set(statuses) - STATUSES:
        return error(400, f"status must be one of {sorted(STATUSES)}")
    store = SqlBuildStore(state(request).db)
    found = store.list_builds(
        statuses or None, _limit(request, 50), request.query_params.get("queue") or None
    )
    return JsonResponse([b.to_json() for b in found])


def results(request: Request) -> Response:
    found = views.results(state(request).db, build_filter(request.query_params))
    return JsonResponse([b.to_json() for b in found])


def build(request: Request) -> Response:
    ident = request.query_params.get("id", "")
    found = SqlBuildStore(state(request).db).get(ident) if ident else None
    if found is None:
        return error(404, f"no build or request {ident!r}")
    return JsonResponse(found.to_json())


def timeline(request: Request) -> Response:
    ident = request.query_params.get("id", "")
    detail = views.build_detail(state(request).db, ident) if ident else None
    if detail is None:
        return error(404, f"no build or request {ident!r}")
    return JsonResponse(detail)


def topics(request: Request) -> Response:
    stats = views.admin_of(state(request).db).topic_stats()
    return JsonResponse([views.topic_json(s) for s in stats])


def lag(request: Request) -> Response:
    topic = request.query_params.get("topic")
    if not topic:
        return error(400, "topic is required")
    groups = views.admin_of(state(request).db).lag(topic)
    return JsonResponse([dataclasses.asdict(g) for g in groups])


def leases(request: Request) -> Response:
    params = request.query_params
    admin = views.admin_of(state(request).db)
    return JsonResponse(admin.leases(params.get("topic") or None, params.get("group") or None))


def dead_letters(request: Request) -> Response:
    params = request.query_params
    topic = params.get("topic")
    if not topic:
        return error(400, "topic is required")
    where = DeadLetterFilter(
        message_id=params.get("id") or None,
        partition_key=params.get("partition") or None,
        group=params.get("group") or None,
        error_contains=params.get("error_contains") or None,
    )
    admin = views.admin_of(state(request).db)
    return JsonResponse(
        admin.dead_letters(original_topic(topic), where, limit=_limit(request, 100))
    )


async def cancel(request: Request) -> Response:
    if (refusal := _authorize(request, "cancel")) is not None:
        return refusal
    ident = request.query_params.get("id", "")
    if not ident:
        return error(400, "id is required")
    result = await run_in_threadpool(
        actions.cancel, state(request).db, ident, client=client(request)
    )
    return JsonResponse(result, status_code=404 if result["outcome"] == "not_found" else 200)


def _dead_letter_action(name: str, run: Callable[..., dict[str, Any]]) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> Response:
        if (refusal := _authorize(request, f"dlq_{name}")) is not None:
            return refusal
        params = request.query_params
        target = actions.DeadLetterTarget(
            topic=params.get("topic", ""),
            message_id=params.get("id") or None,
            partition_key=params.get("partition") or None,
            group=params.get("group") or None,
            error_contains=params.get("error_contains") or None,
            everything=params.get("all") == "1",
        )
        if (problem := target.problem()) is not None:
            return error(400, problem)
        db = state(request).db
        return JsonResponse(await run_in_threadpool(run, db, target, client=client(request)))

    return endpoint


def _authorize(request: Request, action: str) -> Response | None:
    guard = state(request).guard
    if not guard.enabled:
        actions.refused(action, "actions are off", client=client(request))
        return error(403, "actions are off: this server has no token configured")
    if not guard.bearer_matches(request.headers.get("authorization")):
        actions.refused(action, "no or wrong bearer token", client=client(request))
        return error(401, "send the token as 'Authorization: Bearer <token>'")
    return None


def routes() -> list[Route]:
    return [
        Route("/overview", overview),
        Route("/builds", builds),
        Route("/results", results),
        Route("/build", build),
        Route("/build/timeline", timeline),
        Route("/queue/topics", topics),
        Route("/queue/lag", lag),
        Route("/queue/leases", leases),
        Route("/dlq", dead_letters),
        Route("/cancel", cancel, methods=["POST"]),
        Route("/dlq/requeue", _dead_letter_action("requeue", actions.requeue), methods=["POST"]),
        Route("/dlq/purge", _dead_letter_action("purge", actions.purge), methods=["POST"]),
    ]
