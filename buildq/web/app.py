"""The Starlette application: routes, security headers, host check, error pages."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from buildq.config import Config
from buildq.queue.contract import QueueError
from buildq.storage.database import Database
from buildq.web import api, pages
from buildq.web.config import WebConfig
from buildq.web.state import WebState

log = structlog.get_logger("buildq.web")

#: Scripts and styles from this server only, nothing inline, no frames, forms post here only:
#: even markup that slipped through escaping could not run or send anything elsewhere.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    # Build ids and request ids are in this page's URLs: CI links must not receive them.
    (b"referrer-policy", b"no-referrer"),
]
MAX_BODY_BYTES = 64 * 1024


class SecurityHeaders:
    """Adds the headers above to every response; pages and JSON are never cached."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = scope["path"].startswith("/static/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + _HEADERS
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(
    config: Config,
    web: WebConfig,
    db: Database,
    *,
    on_ready: Callable[[], Any] | None = None,
    on_stopping: Callable[[], Any] | None = None,
) -> Starlette:
    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        if on_ready is not None:
            on_ready()
        yield
        # Here, not after the server returns: uvicorn ends by re-raising the SIGTERM it
        # caught, so nothing after it runs.
        if on_stopping is not None:
            on_stopping()

    app = Starlette(
        routes=[
            Route("/", pages.overview),
            Route("/builds", pages.builds),
            Route("/build", pages.build),
            Route("/queue", pages.queue),
            Route("/login", pages.login_form, methods=["GET"]),
            Route("/login", pages.login, methods=["POST"]),
            Route("/logout", pages.logout, methods=["POST"]),
            Route("/cancel", pages.cancel, methods=["POST"]),
            Route("/dead-letters", pages.dead_letters, methods=["POST"]),
            Mount("/api", routes=api.routes()),
            Mount("/static", StaticFiles(packages=[("buildq.web", "static")])),
        ],
        middleware=[
            Middleware(SecurityHeaders),
            # A page on another site cannot read this one through DNS rebinding: the Host
            # header must be a name this server is known by.
            Middleware(TrustedHostMiddleware, allowed_hosts=list(web.allowed_hosts)),
        ],
        exception_handlers={QueueError: _database_unavailable},
        lifespan=lifespan,
        max_body_size=MAX_BODY_BYTES,
    )
    app.state.web = WebState.create(config, web, db)
    return app


def _database_unavailable(request: Request, exc: Exception) -> Response:
    """The database is down or refused a statement: say so instead of a stack trace."""
    log.warning("web_database_error", path=request.url.path, error=str(exc))
    if request.url.path.startswith("/api/"):
        return api.error(503, f"database unavailable: {exc}")
    return pages.render(request, "refused.html", {"reason": f"database unavailable: {exc}"}, 503)
