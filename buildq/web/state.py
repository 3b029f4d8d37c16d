"""What every request handler shares: configuration, database, guard, templates, cache."""

from __future__ import annotations

from dataclasses import dataclass, field

from jinja2 import Environment
from starlette.requests import Request

from buildq.config import Config
from buildq.storage.database import Database
from buildq.web.auth import COOKIE, Guard, LoginThrottle, Session
from buildq.web.config import WebConfig
from buildq.web.overview import LatenessMinutes
from buildq.web.templating import environment


@dataclass
class WebState:
    config: Config
    web: WebConfig
    db: Database
    guard: Guard
    lateness: LatenessMinutes
    throttle: LoginThrottle = field(default_factory=LoginThrottle)
    templates: Environment = field(default_factory=environment)

    @classmethod
    def create(cls, config: Config, web: WebConfig, db: Database) -> WebState:
        return cls(
            config=config,
            web=web,
            db=db,
            guard=Guard(web.token, web.session_ttl_s),
            lateness=LatenessMinutes(web.refresh_s),
        )

    def session(self, request: Request) -> Session | None:
        return self.guard.session(request.cookies.get(COOKIE))


def state(request: Request) -> WebState:
    found: WebState = request.app.state.web
    return found


def client(request: Request) -> str:
    """The client's address for the action log (the proxy's X-Forwarded-For when trusted)."""
    return request.client.host if request.client else "-"
