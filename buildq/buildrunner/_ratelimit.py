"""Spending a CI vendor's request limit carefully: one shared budget, conditional requests.

The vendor modules turn each response's rate-limit headers into a ``RateSignal``;
``RateBudget`` (one per runner instance = one credential) paces requests from those signals
so that many polling builds slow down together instead of each finding the vendor's limit on
its own, and a "rate limited" answer holds every thread until the vendor said to come back.
``ETagCache`` keeps status bodies for ``If-None-Match``: a 304 costs GitHub nothing.
See docs/ci-runners.md ("Rate limits").
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

#: Shortest hold after a "rate limited" answer, and the most jitter added to any hold.
MIN_HOLD_S = 1.0
HOLD_JITTER_S = 1.0


@dataclass(frozen=True, slots=True)
class RateSignal:
    """What one response said about the vendor's limit, in the runner's terms."""

    remaining: int | None = None
    limit: int | None = None
    reset_in_s: float | None = None
    #: Set when the response refused the request for rate reasons: how long to hold off.
    limited_for_s: float | None = None


class RateLimitWait(Exception):
    """The next request slot is further away than the caller may wait."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(f"next request allowed in {wait_s:.1f}s")
        self.wait_s = wait_s


class RateBudget:
    """One credential's request budget, shared by every thread of a runner.

    Requests take slots in order. While plenty of budget is left, slots are free; once the
    remaining requests drop below ``pace_below_fraction`` of the limit, slots are spaced so
    that the remainder lasts until the reset. A 429 (or a secondary limit) holds everyone
    until the vendor said to come back.
    """

    def __init__(
        self,
        *,
        pace_below_fraction: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self._fraction = pace_below_fraction
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._not_before = 0.0
        self._next_slot = 0.0
        self._remaining: int | None = None
        self._limit: int | None = None
        self._reset_at: float | None = None

    def acquire(self, max_wait_s: float) -> None:
        """Wait for this request's slot; raise RateLimitWait rather than wait longer."""
        deadline = self._clock() + max_wait_s
        with self._lock:
            now = self._clock()
            start = max(now, self._not_before, self._next_slot, self._exhausted_until(now))
            if start > deadline:
                raise RateLimitWait(start - now)
            self._next_slot = start + self._spacing(start)
            if self._remaining is not None:
                self._remaining -= 1
        self._sleep_until(start)
        # A 429 seen by another thread while this one slept holds this one too.
        while True:
            with self._lock:
                now, hold_until = self._clock(), self._not_before
            if hold_until <= now:
                return
            if hold_until > deadline:
                raise RateLimitWait(hold_until - now)
            self._sleep_until(hold_until)

    def observe(self, signal: RateSignal) -> None:
        with self._lock:
            now = self._clock()
            if signal.remaining is not None:
                self._remaining = signal.remaining
            if signal.limit is not None:
                self._limit = signal.limit
            if signal.reset_in_s is not None:
                self._reset_at = now + signal.reset_in_s
            if signal.limited_for_s is not None:
                self._not_before = max(self._not_before, now + self._hold_s(signal.limited_for_s))

    def _hold_s(self, limited_for_s: float) -> float:
        """How long a "rate limited" answer holds everyone: what the vendor said, but never
        less than a little (a 429 with ``RateLimit-Reset: 0`` would otherwise be resent at
        once), plus jitter so that runners sharing the limit do not all come back at the same
        instant."""
        return max(limited_for_s, MIN_HOLD_S) + self._rng.uniform(0, HOLD_JITTER_S)

    def _exhausted_until(self, now: float) -> float:
        if self._remaining is not None and self._remaining <= 0 and self._reset_at is not None:
            return self._reset_at if self._reset_at > now else 0.0
        return 0.0

    def _spacing(self, at: float) -> float:
        if self._remaining is None or self._limit is None or self._reset_at is None:
            return 0.0
        if at >= self._reset_at or self._remaining > self._limit * self._fraction:
            return 0.0
        return (self._reset_at - at) / max(self._remaining, 1)

    def _sleep_until(self, when: float) -> None:
        delay = when - self._clock()
        if delay > 0:
            self._sleep(delay)


def header_number(headers: httpx.Headers, name: str) -> float | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def limit_headers(response: httpx.Response, prefix: str, *, reset_is_epoch: bool) -> RateSignal:
    """The ``<prefix>Remaining``/``Limit``/``Reset`` headers a vendor sends on every answer
    (names are case-insensitive). ``reset_is_epoch``: the reset is a Unix time, not seconds
    from now. Whether the answer refused the request, and for how long, is each vendor's own
    rule: the caller sets ``limited_for_s``."""
    headers = response.headers
    remaining = header_number(headers, prefix + "Remaining")
    limit = header_number(headers, prefix + "Limit")
    reset = header_number(headers, prefix + "Reset")
    if reset is not None and reset_is_epoch:
        reset = max(reset - time.time(), 0.0)
    return RateSignal(
        remaining=None if remaining is None else int(remaining),
        limit=None if limit is None else int(limit),
        reset_in_s=reset,
    )


class ETagCache:
    """Bounded LRU of (etag, body) per request key, for conditional GETs."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[str, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[str, Any] | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, key: str, etag: str, body: Any) -> None:
        if self._size <= 0:
            return
        with self._lock:
            self._entries[key] = (etag, body)
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def retry_after_signal(response: httpx.Response) -> RateSignal:
    """For services with no rate limit of their own (Jenkins, Buildbot): a proxy in front may
    answer 429, or 503 with ``Retry-After``, and every thread holds off for that long."""
    retry_after = header_number(response.headers, "Retry-After")
    if response.status_code == 429 or (response.status_code == 503 and retry_after is not None):
        return RateSignal(limited_for_s=retry_after if retry_after is not None else 60.0)
    return RateSignal()
