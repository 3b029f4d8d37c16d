"""The HTML pages and the browser's actions (forms with a session and a CSRF token).

Every page is at the top level (``builds``, ``build?id=…``, ``queue``) and links relatively,
so the page works unchanged behind a reverse proxy that serves it under a sub-path. A page's
live parts are the same templates rendered alone (``?fragment=NAME``), which ``app.js``
fetches every ``refresh_s`` seconds.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs, urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from buildq.buildrunner import BuildStatus
from buildq.metrics import FAILURE_REASONS
from buildq.orchestrator.sqlstore import SqlBuildStore
from buildq.web import actions, views
from buildq.web.auth import COOKIE, CSRF_FIELD
from buildq.web.overview import Overview
from buildq.web.state import client, state

NOTICES = {
    "cancel-requested": "Cancellation requested: the poll loop tells the runner at once.",
    "already-finished": "That build has already finished: nothing to cancel.",
    "not-found": "No such build.",
    "signed-in": "Signed in: actions are available in this browser until it signs out.",
    "signed-out": "Signed out.",
    "requeued": "Requeued {n} dead letter(s).",
    "purged": "Purged {n} dead letter(s).",
}
_NEXT = re.compile(r"(?:|builds|build|queue)(?:\?[^\\\s]*)?")
STATUSES = [s.value for s in BuildStatus]
REASONS = sorted(FAILURE_REASONS)


def render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    st = state(request)
    session = st.session(request)
    notice = NOTICES.get(request.query_params.get("notice", ""), "")
    count = request.query_params.get("n", "")
    base = {
        "actions": st.guard.enabled,
        "signed_in": session is not None,
        "csrf": st.guard.csrf_token(session) if session else "",
        "refresh_s": st.web.refresh_s,
        "notice": notice.format(n=int(count) if count.isdigit() else 0),
        "here": _here(request),
        "page": "",
        "live": False,
        "queues": sorted(st.config.queues),
    }
    html = st.templates.get_template(template).render(base | context)
    return HTMLResponse(html, status_code=status)


def _here(request: Request) -> str:
    """This page as a relative URL (the login form's way back)."""
    name = request.url.path.rsplit("/", 1)[-1]
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("notice", "n")]
    return name + ("?" + urlencode(params) if params else "")


def _fragment_url(request: Request, name: str) -> str:
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in ("fragment",)]
    params = [(k, v) for k, v in params if k not in ("notice", "n")]
    page = request.url.path.rsplit("/", 1)[-1]
    return f"{page}?{urlencode([*params, ('fragment', name)])}"


def overview(request: Request) -> Response:
    st = state(request)
    data = Overview(st.db, st.config, st.lateness).read()
    if request.query_params.get("fragment") == "body":
        return render(request, "_overview.html", {"o": data})
    refresh = _fragment_url(request, "body")
    return render(
        request, "overview.html", {"o": data, "page": "overview", "live": True, "refresh": refresh}
    )


def builds(request: Request) -> Response:
    st = state(request)
    where = build_filter(request.query_params)
    fragment = request.query_params.get("fragment")
    context: dict[str, Any] = {"f": where, "statuses": STATUSES, "reasons": REASONS}
    if fragment in (None, "live"):
        context["now"] = SqlBuildStore(st.db).now_ms()
        context["live_builds"] = views.in_flight(st.db, where)
        context["shown_max"] = views.IN_FLIGHT_SHOWN
    if fragment in (None, "results"):
        found = views.results(st.db, where)
        context["results"] = found
        context["older"] = _older_url(request, found)
    if fragment == "live":
        return render(request, "_live.html", context)
    if fragment == "results":
        return render(request, "_results.html", context)
    context |= {
        "page": "builds",
        "live": True,
        "live_url": _fragment_url(request, "live"),
        "results_url": _fragment_url(request, "results"),
        "paged": where.before is not None,
    }
    return render(request, "builds.html", context)


def build_filter(params: Any) -> views.BuildFilter:
    before = None
    at, sep, request_id = (params.get("before") or "").partition(":")
    if sep and at.isdigit():
        before = (int(at), request_id)
    return views.BuildFilter(
        queue=params.get("queue") or None,
        status=params.get("status") or None,
        reason=params.get("reason") or None,
        text=(params.get("q") or "").strip() or None,
        before=before,
    )


def _older_url(request: Request, found: list[Any]) -> str | None:
    if len(found) < views.RESULTS_PAGE:
        return None
    last = found[-1]
    skip = ("before", "fragment", "notice", "n")
    params = [(k, v) for k, v in request.query_params.multi_items() if k not in skip]
    params.append(("before", f"{last.updated_at_ms}:{last.request_id}"))
    return "builds?" + urlencode(params)


def build(request: Request) -> Response:
    st = state(request)
    ident = request.query_params.get("id", "")
    detail = views.build_detail(st.db, ident) if ident else None
    if detail is None:
        return render(request, "missing.html", {"ident": ident}, status=404)
    if request.query_params.get("fragment") == "body":
        return render(request, "_build.html", {"d": detail})
    refresh = _fragment_url(request, "body")
    return render(
        request, "build.html", {"d": detail, "page": "builds", "live": True, "refresh": refresh}
    )


def queue(request: Request) -> Response:
    st = state(request)
    data = views.queue_view(st.db)
    if request.query_params.get("fragment") == "body":
        return render(request, "_queue.html", {"qv": data})
    refresh = _fragment_url(request, "body")
    return render(
        request, "queue.html", {"qv": data, "page": "queue", "live": True, "refresh": refresh}
    )


# --- signing in and out --------------------------------------------------------------------


def login_form(request: Request) -> Response:
    return render(request, "login.html", {"next": _safe_next(request.query_params.get("next"))})


async def login(request: Request) -> Response:
    st = state(request)
    form = await _form(request)
    target = _safe_next(form.get("next"))
    if not st.guard.enabled:
        return _refuse(request, "login", "actions are off: this server has no token configured")
    if st.throttle.blocked():
        return _refuse(request, "login", "too many failed sign-ins: wait a minute", status=429)
    if not st.guard.token_matches(form.get("token", "")):
        st.throttle.failed()
        actions.refused("login", "wrong token", client=client(request))
        context = {"next": target, "error": "That is not the token."}
        return render(request, "login.html", context, status=403)
    actions.log.info("web_signed_in", client=client(request))
    response = RedirectResponse(_with_notice(target, "signed-in"), status_code=303)
    response.set_cookie(
        COOKIE,
        st.guard.new_session(),
        max_age=int(st.web.session_ttl_s),
        path=None,  # the directory of this page: right at the root and under a proxy's sub-path
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


async def logout(request: Request) -> Response:
    if (refusal := await _check_session(request, "logout")) is not None:
        return refusal
    response = RedirectResponse("./?notice=signed-out", status_code=303)
    response.delete_cookie(COOKIE, path=None)  # type: ignore[arg-type]
    return response


# --- actions -------------------------------------------------------------------------------


async def cancel(request: Request) -> Response:
    form = await _form(request)
    if (refusal := await _check_session(request, "cancel", form)) is not None:
        return refusal
    ident = form.get("id", "")
    result = await run_in_threadpool(
        actions.cancel, state(request).db, ident, client=client(request)
    )
    notice = {"requested": "cancel-requested", "already_finished": "already-finished"}
    code = notice.get(result["outcome"], "not-found")
    return RedirectResponse(_with_notice(f"build?{urlencode({'id': ident})}", code), 303)


async def dead_letters(request: Request) -> Response:
    form = await _form(request)
    what = form.get("action", "")
    if (refusal := await _check_session(request, f"dlq_{what}", form)) is not None:
        return refusal
    target = actions.DeadLetterTarget(
        topic=form.get("topic", ""),
        message_id=form.get("id") or None,
        partition_key=form.get("partition") or None,
        group=form.get("group") or None,
        error_contains=form.get("error_contains") or None,
        everything=form.get("all") == "1",
    )
    problem = target.problem() or (None if what in ("requeue", "purge") else "unknown action")
    if problem is not None:
        return _refuse(request, f"dlq_{what}", problem, status=400)
    db = state(request).db
    if what == "requeue":
        result = await run_in_threadpool(actions.requeue, db, target, client=client(request))
        notice, count = "requeued", len(result["requeued"])
    else:
        result = await run_in_threadpool(actions.purge, db, target, client=client(request))
        notice, count = "purged", int(result["deleted"])
    return RedirectResponse(f"queue?notice={notice}&n={count}", status_code=303)


async def _check_session(
    request: Request, action: str, form: dict[str, str] | None = None
) -> Response | None:
    """None when the request may act; else the refusal page (and the refusal is logged)."""
    st = state(request)
    if not st.guard.enabled:
        return _refuse(request, action, "actions are off: this server has no token configured")
    session = st.session(request)
    if session is None:
        return _refuse(request, action, "not signed in: sign in with the token first")
    form = form if form is not None else await _form(request)
    if not st.guard.csrf_matches(session, form.get(CSRF_FIELD)):
        return _refuse(request, action, "the form is stale or from another site: reload the page")
    return None


def _refuse(request: Request, action: str, reason: str, status: int = 403) -> Response:
    actions.refused(action, reason, client=client(request))
    return render(request, "refused.html", {"reason": reason}, status=status)


async def _form(request: Request) -> dict[str, str]:
    """An urlencoded form's first value per field (the stdlib parses it; no multipart)."""
    body = await request.body()
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


def _safe_next(target: str | None) -> str:
    """Only this server's own pages, as relative URLs: never an open redirect."""
    return target if target and _NEXT.fullmatch(target) else "./"


def _with_notice(target: str, notice: str) -> str:
    return target + ("&" if "?" in target else "?") + f"notice={notice}"
