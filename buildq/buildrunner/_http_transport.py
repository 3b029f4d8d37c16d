"""How the HTTP build runners send requests: settings, client factory, retries, ETags.

The runner modules (``buildkite``, ``github``, ...; their base class is in ``_http_runner``)
speak their vendor's paths and vocabulary; everything about *how* a request is sent lives
here, so every HTTP runner waits, retries and fails the same way:

- every request first takes a slot from the runner's one ``RateBudget`` (``_ratelimit``);
- reads are retried on transport errors and 5xx with tenacity, then surface as
  ``TransientRunnerError`` so the orchestrator nacks;
- creates are never blind-retried: an ambiguous outcome is resolved by looking the build up
  by its correlation token (``_http_runner.create_idempotently``);
- error text is built here and scrubbed of the token.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import structlog
import tenacity

from buildq.buildrunner._ratelimit import ETagCache, RateBudget, RateLimitWait, RateSignal
from buildq.buildrunner.contract import (
    BuildNotFound,
    RunnerError,
    RunnerThrottled,
    RunnerUnauthorized,
    TransientRunnerError,
)
from buildq.config.base import Secret, Table

#: How often one request may be answered "rate limited" before the call gives up.
_MAX_RATE_LIMITED_REPLIES = 4
_MAX_ERROR_TEXT = 200


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """Transport settings every HTTP runner table shares (flat keys in the runner's table)."""

    api_url: str
    token: Secret
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    retry_attempts: int = 3
    retry_backoff_s: float = 0.5
    retry_max_backoff_s: float = 5.0
    max_rate_wait_s: float = 1.0
    pace_below_fraction: float = 0.5
    etag_cache_size: int = 2048
    lookup_attempts: int = 5
    lookup_interval_s: float = 2.0

    @classmethod
    def from_table(
        cls, table: Table, *, default_api_url: str, token_required: bool = True
    ) -> HttpSettings:
        # Without a token (a service that allows anonymous API use) nothing is sent for it.
        token = table.secret("token", required=token_required) or Secret("", "none")
        return cls(
            api_url=table.str("api_url", default_api_url).rstrip("/"),
            token=token,
            connect_timeout_s=table.float("connect_timeout_s", 5.0, min=0.01),
            read_timeout_s=table.float("read_timeout_s", 15.0, min=0.01),
            retry_attempts=table.int("retry_attempts", 3, min=1, max=20),
            retry_backoff_s=table.float("retry_backoff_s", 0.5, min=0.0),
            retry_max_backoff_s=table.float("retry_max_backoff_s", 5.0, min=0.0),
            max_rate_wait_s=table.float("max_rate_wait_s", 1.0, min=0.0),
            pace_below_fraction=table.float("pace_below_fraction", 0.5, min=0.0, max=1.0),
            etag_cache_size=table.int("etag_cache_size", 2048, min=0),
            lookup_attempts=table.int("lookup_attempts", 5, min=1, max=100),
            lookup_interval_s=table.float("lookup_interval_s", 2.0, min=0.0),
        )


def backoff(settings: HttpSettings) -> tenacity.wait.wait_base:
    """The wait before attempt n+1 of a read or a create (docs/ci-runners.md): exponential
    from ``retry_backoff_s``, doubling, capped at ``retry_max_backoff_s``, plus up to
    ``retry_backoff_s`` of random jitter so that runners that failed together do not retry
    in step."""
    return tenacity.wait_exponential(
        multiplier=settings.retry_backoff_s, max=settings.retry_max_backoff_s
    ) + tenacity.wait_random(0, settings.retry_backoff_s)


def make_client(settings: HttpSettings, headers: Mapping[str, str] | None = None) -> httpx.Client:
    """An httpx client for one runner: base URL, bearer auth, explicit timeouts."""
    timeout = httpx.Timeout(
        connect=settings.connect_timeout_s,
        read=settings.read_timeout_s,
        write=settings.read_timeout_s,
        pool=settings.connect_timeout_s,
    )
    token = settings.token.reveal()
    bearer = {"Authorization": f"Bearer {token}"} if token else {}
    all_headers = {**bearer, **(headers or {})}
    # Redirects are followed as GitHub asks of clients (a renamed repository answers 301, or
    # 307 for writes); httpx drops the Authorization header when one leads to another host.
    return httpx.Client(
        base_url=settings.api_url, headers=all_headers, timeout=timeout, follow_redirects=True
    )


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: Any
    #: The answer's headers (Jenkins names the queue item it created in ``Location``).
    headers: Mapping[str, str] = field(default_factory=dict)


class VendorError(RunnerError):
    """The vendor refused a request (a 4xx that is not "not found" nor "rate limited")."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class NotSent(Exception):
    """The request never reached the vendor (connect failed): resending cannot duplicate."""


class Ambiguous(Exception):
    """The vendor may or may not have acted on the request (timeout, reset, 5xx)."""


class _Retryable(Exception):
    """A read failed in a way worth another attempt."""


_NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


class HttpCore:
    """Sends one runner's requests through its budget, retry policy and ETag cache."""

    def __init__(
        self,
        client: httpx.Client,
        settings: HttpSettings,
        *,
        vendor: str,
        rate_signal: Callable[[httpx.Response], RateSignal],
        budget: RateBudget | None = None,
        sleep: Callable[[float], None] = time.sleep,
        log: Any = None,
        secrets: Sequence[Secret] = (),
    ) -> None:
        """``secrets``: what requests carry besides the API token (a trigger token in a
        body), which a vendor may quote back in an error."""
        self.client = client
        self.settings = settings
        self.vendor = vendor
        self.budget = budget or RateBudget(
            pace_below_fraction=settings.pace_below_fraction, sleep=sleep
        )
        self.etags = ETagCache(settings.etag_cache_size)
        self.sleep = sleep
        self.log = log if log is not None else structlog.get_logger("buildq.buildrunner")
        self._rate_signal = rate_signal
        self._secrets = (settings.token, *secrets)

    def read(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        conditional: bool = False,
        accept: frozenset[int] = frozenset(),
        missing_is_not_found: bool = True,
    ) -> Reply:
        """A request that is safe to repeat; transient failures are retried, then raised.

        A 404 raises BuildNotFound when ``missing_is_not_found`` (the path names a build),
        a plain RunnerError otherwise (a missing pipeline or workflow is a config error).
        """
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.settings.retry_attempts),
            wait=backoff(self.settings),
            retry=tenacity.retry_if_exception_type(_Retryable),
            sleep=self.sleep,
            before_sleep=lambda state: self._log_retry(method, path, state),
            reraise=True,
        )
        try:
            return retrying(
                self._read_once,
                method,
                path,
                params,
                body,
                conditional,
                accept,
                missing_is_not_found,
            )
        except _Retryable as err:
            raise TransientRunnerError(
                f"{self.vendor} {method} {path} failed after "
                f"{self.settings.retry_attempts} attempts: {err}"
            ) from None

    def write_once(
        self, method: str, path: str, *, body: Any = None, form: Mapping[str, str] | None = None
    ) -> Reply:
        """A request that must not be repeated blindly: raises NotSent or Ambiguous.

        ``body`` is sent as JSON, ``form`` as ``application/x-www-form-urlencoded``.
        """
        try:
            response = self._send(method, path, body=body, form=form)
        except _NOT_SENT_ERRORS as err:
            raise NotSent(f"{type(err).__name__}") from err
        except httpx.TransportError as err:
            raise Ambiguous(f"{type(err).__name__}") from err
        if response.status_code >= 500:
            raise Ambiguous(f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise self.error(method, path, response)
        return Reply(response.status_code, _json_or_none(response), response.headers)

    def error(
        self, method: str, path: str, response: httpx.Response, *, not_found: bool = False
    ) -> RunnerError:
        """The RunnerError for a 4xx answer; its text never holds the token (nor ``secrets``)."""
        detail = _message_of(response)
        text = f"{self.vendor} answered {response.status_code} to {method} {path}"
        if detail:
            text += f": {detail}"
        text = self.scrub(text)
        if response.status_code in (401, 403):
            # Rate-limit 403s never get here (``_send`` waits them out).
            refused = f"{self.vendor} answered {response.status_code}"
            summary = f"{refused} ({detail})" if detail else refused
            return RunnerUnauthorized(
                text, self.scrub(f"{summary}: check the token and its permissions")
            )
        if response.status_code == 404 and not_found:
            return BuildNotFound(text)
        return VendorError(text, response.status_code)

    def scrub(self, text: str) -> str:
        for secret in self._secrets:
            value = secret.reveal()
            if value:
                text = text.replace(value, "<redacted>")
        return text

    def _read_once(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None,
        body: Any,
        conditional: bool,
        accept: frozenset[int],
        missing_is_not_found: bool,
    ) -> Reply:
        key = _cache_key(path, params)
        cached = self.etags.get(key) if conditional else None
        headers = {"If-None-Match": cached[0]} if cached else None
        try:
            response = self._send(method, path, params=params, body=body, headers=headers)
        except httpx.TransportError as err:
            raise _Retryable(type(err).__name__) from err
        status = response.status_code
        if status == 304 and cached is not None:
            return Reply(200, cached[1])
        if status >= 500:
            raise _Retryable(f"HTTP {status}")
        if status >= 400 and status not in accept:
            raise self.error(method, path, response, not_found=missing_is_not_found)
        answer = _json_or_none(response)
        etag = response.headers.get("ETag")
        if conditional and etag and status == 200:
            self.etags.put(key, etag, answer)
        return Reply(status, answer)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        form: Mapping[str, str] | None = None,
    ) -> httpx.Response:
        """One logical request: waits for budget, resends only on "rate limited" replies."""
        for _ in range(_MAX_RATE_LIMITED_REPLIES):
            try:
                self.budget.acquire(self.settings.max_rate_wait_s)
            except RateLimitWait as wait:
                # Not sent, and not a failure: the daemon hands the delivery back until then
                # instead of holding a thread (or a retry) for the wait.
                raise RunnerThrottled(
                    f"{self.vendor} rate limit: {wait} (more than max_rate_wait_s="
                    f"{self.settings.max_rate_wait_s:g})",
                    wait.wait_s,
                ) from None
            try:
                response = self.client.request(
                    method, path, params=params, json=body, data=form, headers=headers
                )
            except httpx.TooManyRedirects:
                raise RunnerError(f"{self.vendor} {method} {path}: too many redirects") from None
            signal = self._rate_signal(response)
            self.budget.observe(signal)
            if signal.limited_for_s is None:
                return response
            self.log.warning(
                "runner_rate_limited",
                vendor=self.vendor,
                status=response.status_code,
                wait_s=round(signal.limited_for_s, 3),
            )
        raise TransientRunnerError(
            f"{self.vendor} kept answering 'rate limited' to {method} {path}"
        )

    def _log_retry(self, method: str, path: str, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        reason = str(outcome.exception()) if outcome is not None else ""
        self.log.info(
            "runner_request_retry",
            vendor=self.vendor,
            method=method,
            path=path,
            attempt=state.attempt_number,
            reason=reason,
        )


def _cache_key(path: str, params: Mapping[str, str] | None) -> str:
    if not params:
        return path
    return path + "?" + "&".join(f"{k}={v}" for k, v in sorted(params.items()))


def _json_or_none(response: httpx.Response) -> Any:
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return None


def _message_of(response: httpx.Response) -> str:
    body = _json_or_none(response)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        text: str = body["message"]
    else:
        text = response.text if response.headers.get("content-type", "").startswith("text/") else ""
    text = " ".join(text.split())
    return text[:_MAX_ERROR_TEXT]
