"""Who may act: the configured token, the browser session it opens, and CSRF tokens.

Nothing here stores state. A session cookie is ``<issued ms>.<nonce>.<mac>``, the MAC keyed by
a key derived from the token, so every process serving the page accepts it, changing the
token signs everyone out, and the cookie never holds the token itself. A form's CSRF token is
a MAC of the session's nonce: a page from another origin can make the browser send the
cookie, but it cannot read the form to learn the CSRF token. Scripts use
``Authorization: Bearer <token>`` instead, which a browser never adds by itself.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass

from buildq.config import Secret

COOKIE = "buildq_web_session"
CSRF_FIELD = "csrf"


@dataclass(frozen=True)
class Session:
    nonce: str
    issued_ms: int


class Guard:
    """Checks the token, issues and verifies sessions; ``token`` None means actions are off."""

    def __init__(self, token: Secret | None, session_ttl_s: float) -> None:
        self._token = token.reveal().encode() if token is not None else None
        self._key = (
            hmac.new(self._token, b"buildq-web-session-v1", hashlib.sha256).digest()
            if self._token is not None
            else b""
        )
        self._ttl_ms = int(session_ttl_s * 1000)

    @property
    def enabled(self) -> bool:
        return self._token is not None

    def token_matches(self, given: str) -> bool:
        if self._token is None:
            return False
        return hmac.compare_digest(given.encode("utf-8", "replace"), self._token)

    def bearer_matches(self, header: str | None) -> bool:
        scheme, _, value = (header or "").partition(" ")
        return scheme.lower() == "bearer" and self.token_matches(value.strip())

    def new_session(self) -> str:
        issued = str(int(time.time() * 1000))
        nonce = secrets.token_urlsafe(18)
        return f"{issued}.{nonce}.{self._mac('session', issued, nonce)}"

    def session(self, cookie: str | None) -> Session | None:
        """The session a cookie proves, or None (absent, forged, expired, or actions off)."""
        if not self.enabled or not cookie:
            return None
        parts = cookie.split(".")
        if len(parts) != 3 or not parts[0].isdigit():
            return None
        issued, nonce, mac = parts
        if not hmac.compare_digest(mac, self._mac("session", issued, nonce)):
            return None
        age_ms = int(time.time() * 1000) - int(issued)
        if not 0 <= age_ms <= self._ttl_ms:
            return None
        return Session(nonce, int(issued))

    def csrf_token(self, session: Session) -> str:
        return self._mac("csrf", session.nonce)

    def csrf_matches(self, session: Session, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given, self.csrf_token(session))

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._key, ".".join(parts).encode(), hashlib.sha256).hexdigest()


class LoginThrottle:
    """At most ``limit`` failed logins per ``window_s`` in this process: guessing the token
    through the form stays impractically slow, while an operator's typo costs nothing."""

    def __init__(self, limit: int = 10, window_s: float = 60.0) -> None:
        self._limit = limit
        self._window_s = window_s
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def blocked(self) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            return len(self._failures) >= self._limit

    def failed(self) -> None:
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            self._failures.append(now)

    def _expire(self, now: float) -> None:
        while self._failures and now - self._failures[0] > self._window_s:
            self._failures.popleft()
