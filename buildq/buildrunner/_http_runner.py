"""The HTTP runners' base class, ``HttpRunner``, and what they share above the transport.

Every CI runner (``buildkite``, ``github``, ``gitlab``, ``jenkins``, ``buildbot``) is an
``HttpRunner``: its config, a name, a log bound to it, the HTTP core (``_http_transport``) and
its rate budget, ``close``. A subclass says who it is in class attributes (``kind``,
``vendor``, ``rate_signal``) and derives any state of its own from the config in ``_setup``.
Here too: creating a build at most once per correlation token, and the wire forms the vendors
share for change lists and timestamps.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import ClassVar, Generic, Protocol, TypeGuard, TypeVar

import httpx
import structlog
import tenacity

from buildq.buildrunner._http_transport import (
    Ambiguous,
    HttpCore,
    HttpSettings,
    NotSent,
    VendorError,
    backoff,
)
from buildq.buildrunner._ratelimit import RateBudget, retry_after_signal
from buildq.buildrunner.contract import (
    BuildNotFound,
    Change,
    RunnerError,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.config.base import Secret

T = TypeVar("T")

#: Characters a request id is made of: a token must not touch one to count as a whole word.
_TOKEN_EDGE = r"A-Za-z0-9_.-"


class HttpConfig(Protocol):
    """What ``HttpRunner`` reads of a runner's config: the shared transport settings."""

    @property
    def http(self) -> HttpSettings: ...


ConfigT = TypeVar("ConfigT", bound=HttpConfig)


class HttpRunner(Generic[ConfigT]):
    """The part of an HTTP runner that is not its vendor's vocabulary. Thread-safe."""

    #: The runner type (``RUNNER_KIND``'s name), and a runner's name when none is given.
    kind: ClassVar[str]
    #: How the vendor is named in logs and errors.
    vendor: ClassVar[str]
    #: Reads a response's rate-limit headers. Even a vendor with none of its own can sit
    #: behind a proxy that answers 429, or 503 with ``Retry-After``: that is the default.
    rate_signal = staticmethod(retry_after_signal)

    def __init__(
        self,
        config: ConfigT,
        client: httpx.Client,
        *,
        name: str | None = None,
        budget: RateBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = config
        self.name = self.kind if name is None else name
        self._log = structlog.get_logger("buildq.buildrunner").bind(runner=self.name)
        self._core = HttpCore(
            client,
            config.http,
            vendor=self.vendor,
            rate_signal=self.rate_signal,
            budget=budget,
            sleep=sleep,
            log=self._log,
            secrets=self._secrets(),
        )
        self._setup()

    def _setup(self) -> None:
        """Per-instance state a subclass derives from ``self.config``; runs last in ``__init__``."""

    def _secrets(self) -> Sequence[Secret]:
        """Credentials of the config besides the API token that requests carry: no error
        text shows them."""
        return ()

    @property
    def budget(self) -> RateBudget:
        return self._core.budget

    def close(self) -> None:
        """Close the HTTP client: the daemon calls this when it stops."""
        self._core.client.close()


class _CreateAgain(Exception):
    """This create attempt created nothing (it never left, or the lookup found nothing)."""


def create_idempotently(
    core: HttpCore,
    *,
    token: str | None,
    create: Callable[[], T],
    lookup: Callable[[], T | None],
    lookup_first: bool = True,
) -> T:
    """Create a build at most once per token, resolving ambiguous outcomes by lookup.

    With a token, an earlier attempt (this call's or a previous trigger's) is found by the
    token before anything new is created. Without one, an ambiguous create is reported as
    transient and never repeated: only the caller can know whether to try again. Attempts
    are spaced like reads (``_http_transport.backoff``: exponential, jittered).
    """
    settings = core.settings
    if token and lookup_first:
        found = lookup()
        if found is not None:
            core.log.info("runner_build_found_by_token", vendor=core.vendor, phase="before")
            return found

    def attempt() -> T:
        try:
            return create()
        except NotSent as err:
            raise _CreateAgain(str(err)) from None
        except Ambiguous as err:
            core.log.warning(
                "runner_create_ambiguous", vendor=core.vendor, reason=str(err), token=bool(token)
            )
            if not token:
                raise TransientRunnerError(
                    f"{core.vendor} create outcome unknown ({err}) and no correlation token "
                    "to look it up: not retried"
                ) from None
            found = poll_lookup(core, lookup)
            if found is None:
                raise _CreateAgain(f"{err}; not found by token") from None
            core.log.info("runner_build_found_by_token", vendor=core.vendor, phase="after")
            return found

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(settings.retry_attempts),
        wait=backoff(settings),
        retry=tenacity.retry_if_exception_type(_CreateAgain),
        sleep=core.sleep,
        reraise=True,
    )
    try:
        return retrying(attempt)
    except _CreateAgain as err:
        raise TransientRunnerError(
            f"{core.vendor} create failed after {settings.retry_attempts} attempts: {err}"
        ) from None


def confirm_missing(
    core: HttpCore, err: BuildNotFound, parent_path: str, parent: str
) -> RunnerError:
    """What a 404 on a build this runner created means: the build is gone only if its
    ``parent`` (repository, pipeline) is visible. If that is 404 too, the token cannot see it
    (GitHub answers 404, not 403, to a token without access to a private repository): the
    runner is refused, and the build must not be failed as lost."""
    try:
        core.read("GET", parent_path, missing_is_not_found=False)
    except VendorError as parent_err:
        if parent_err.status != 404:
            raise
        return RunnerUnauthorized(
            f"{err}; {parent} answered 404 too: the token cannot see it (no access, or it "
            "was renamed or deleted)",
            f"{core.vendor} answered 404 for a build this runner created and for {parent}: "
            "check that the token can see it",
        )
    return err


def poll_lookup(core: HttpCore, lookup: Callable[[], T | None]) -> T | None:
    """Look a build up a bounded number of times: listings lag behind creates."""
    for attempt in range(core.settings.lookup_attempts):
        if attempt:
            core.sleep(core.settings.lookup_interval_s)
        found = lookup()
        if found is not None:
            return found
    return None


def positive_int(value: object, below: int = 10**18) -> TypeGuard[int]:
    """A positive JSON integer under ``below`` (``true`` is an int to Python, not to JSON).
    The default keeps ids within the 18 digits the build ids take."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < below


def mentions_token(text: object, token: str) -> bool:
    """Whether a vendor's free text (a run-name, a force reason) carries the token as a whole
    word (``req-1`` is not in ``req-12``): where the vendor keeps nothing else of the trigger,
    that text is how a lost create is found again."""
    if not isinstance(text, str):
        return False
    pattern = rf"(?<![{_TOKEN_EDGE}]){re.escape(token)}(?![{_TOKEN_EDGE}])"
    return re.search(pattern, text) is not None


def changes_json(changes: Sequence[Change]) -> str:
    """The documented wire form of a change list: a compact JSON list of {id, revision, extra}."""
    return json.dumps(
        [{"id": c.id, "revision": c.revision, "extra": dict(c.extra)} for c in changes],
        separators=(",", ":"),
        ensure_ascii=False,
    )


def time_metadata(started: object, finished: object) -> dict[str, str]:
    """``started_at``/``finished_at``/``duration_s`` from vendor timestamps, in buildq's format
    (UTC, milliseconds; duration so far while the build runs)."""
    start, end = _parse_time(started), _parse_time(finished)
    meta: dict[str, str] = {}
    if start is not None:
        meta["started_at"] = start.isoformat(timespec="milliseconds")
        duration = ((end or datetime.now(UTC)) - start).total_seconds()
        meta["duration_s"] = f"{max(duration, 0.0):.3f}"
    if end is not None:
        meta["finished_at"] = end.isoformat(timespec="milliseconds")
    return meta


def _parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def new_request_id() -> str:
    """A stand-in correlation token when the caller gave none (never used to retry)."""
    return f"buildq-{uuid.uuid4().hex}"
