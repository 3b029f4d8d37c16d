"""The claims a member holds, and the lease thread that keeps them alive.

A delivery the member fetched is tracked here until it is settled or lost. Until then the
lease thread keeps its claim alive: a claim with less than half its visibility timeout left is
extended, in one statement for all of them, so a delivery whose work takes longer than the
timeout (a slow CI call) is not delivered again meanwhile. A claim that cannot be extended
any more (its lease moved) is marked lost. The same thread renews the member's leases; when
renewal fails for longer than an interval, ``problem`` says why (for /readyz).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog
from sqlalchemy.engine import Connection

from buildq.queue.sql import batch_queries as bq
from buildq.queue.sql import queries as q
from buildq.queue.sql.delivery import ClaimState, SqlDelivery
from buildq.queue.sql.leases import Membership

log = structlog.get_logger("buildq.queue")


class ClaimKeeper:
    """One member's unsettled claims and its lease thread (see the module docstring)."""

    def __init__(self, membership: Membership, emit: Callable[..., None]) -> None:
        self.membership = membership
        self.db = membership.db
        self.settings = membership.settings
        self._emit = emit
        self._lock = threading.Lock()
        self._outstanding: dict[int, SqlDelivery] = {}  # offset -> its current claim
        self._claiming: set[int] = set()  # slots a fetch in progress claims from
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Since when (monotonic) and why lease renewal fails; None while it succeeds.
        self._renewal_failing: tuple[float, str] | None = None

    # --- the claims -----------------------------------------------------------------------

    @contextmanager
    def claiming(self, slots: dict[int, int]) -> Iterator[None]:
        """While a fetch claims from ``slots``: they are busy, the renewer must not release
        them."""
        with self._lock:
            self._claiming = set(slots)
        try:
            yield
        finally:
            with self._lock:
                self._claiming = set()

    def track(self, fetched: list[SqlDelivery]) -> None:
        with self._lock:
            for delivery in fetched:
                earlier = self._outstanding.get(delivery.offset)
                if earlier is not None:
                    # Our own claim timed out (the database was unreachable for longer
                    # than the visibility timeout) and we claimed it again: the earlier
                    # claim is gone, whatever its work still does.
                    earlier.mark(ClaimState.LOST)
                self._outstanding[delivery.offset] = delivery

    def drop(self, delivery: SqlDelivery) -> None:
        """Stop tracking ``delivery`` (settled, or lost)."""
        with self._lock:
            if self._outstanding.get(delivery.offset) is delivery:
                del self._outstanding[delivery.offset]

    def forget(self, delivery: SqlDelivery) -> None:
        """The delivery is lost to this member (fenced): stop tracking it."""
        delivery.mark(ClaimState.LOST)
        self.drop(delivery)

    def unsettled(self) -> list[SqlDelivery]:
        with self._lock:
            return list(self._outstanding.values())

    def _busy_slots(self) -> set[int]:
        with self._lock:
            return {d.slot for d in self._outstanding.values()} | self._claiming

    # --- the lease thread -----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._run, name=f"lease-{self.membership.topic}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.settings.renew_interval_ms / 1000 + 5)

    def _run(self) -> None:
        """Lease renewal and claim keeping, on one thread: neither waits on the other's locks.

        Claims are looked at four times per visibility timeout (at most), leases every
        ``renew_interval_ms``."""
        renew_s = self.settings.renew_interval_ms / 1000
        tick_s = min(renew_s, self.settings.visibility_timeout_ms / 4000)
        next_renewal = time.monotonic() + renew_s
        while not self._stop.wait(tick_s):
            if time.monotonic() >= next_renewal:
                next_renewal = time.monotonic() + renew_s
                self._renew()
            try:
                self.keep_claims_alive()
            except Exception as err:  # the next tick tries again
                self._emit("claim_keeping_failed", error=str(err))

    def _renew(self) -> None:
        topic = self.membership.topic
        try:
            self.membership.tick(busy_slots=self._busy_slots())
        except Exception as err:  # the next tick tries again; leases expire meanwhile
            error = str(err).splitlines()[0][:300]
            if self._renewal_failing is None:  # said once when it starts, once when it ends
                log.warning("lease_renewal_failed", topic=topic, error=error)
                self._renewal_failing = (time.monotonic(), error)
            self._emit("lease_renewal_failed", error=error)
            return
        if self._renewal_failing is not None:
            failed_s = round(time.monotonic() - self._renewal_failing[0], 1)
            log.info("lease_renewal_recovered", topic=topic, failed_s=failed_s)
            self._renewal_failing = None

    def problem(self) -> str | None:
        """Why this member cannot work now: its leases have not been renewed for over a
        renewal interval (the database refuses writes: down, or a full disk)."""
        failing = self._renewal_failing
        if (
            failing is None
            or time.monotonic() - failing[0] < self.settings.renew_interval_ms / 1000
        ):
            return None
        return (
            f"leases of {self.membership.topic!r} not renewed for "
            f"{time.monotonic() - failing[0]:.0f}s: {failing[1]}"
        )

    def keep_claims_alive(self) -> int:
        """Extend every claim with less than half its visibility timeout left; returns how
        many were extended. One whose lease this member no longer holds is marked lost."""
        timeout_ms = self.settings.visibility_timeout_ms
        now = time.monotonic()
        owned = self.membership.owned()
        with self._lock:
            due = [
                d
                for d in self._outstanding.values()
                if d.claimed_until - now < timeout_ms / 2000 and d._state is not ClaimState.LOST
            ]
        fenced = [d for d in due if owned.get(d.slot) != d.epoch]
        for delivery in fenced:
            self.forget(delivery)
        keep = [d for d in due if owned.get(d.slot) == d.epoch]
        if not keep:
            return 0
        lost = self.db.write(lambda conn: self._extend_in(conn, keep, timeout_ms))
        for delivery in keep:
            if delivery.offset in lost:
                self.forget(delivery)
            else:
                delivery.claimed_until = now + timeout_ms / 1000
        return len(keep) - len(lost)

    def _extend_in(self, conn: Connection, claims: list[SqlDelivery], ms: int) -> set[int]:
        """Extend ``claims`` by ``ms``; the offsets of those no longer ours."""
        group = self.membership.group
        sql = bq.BatchSql.of(conn.dialect)
        extended = sql.extend_claims(conn, group, [(d.offset, d.attempt) for d in claims], ms)
        if extended == len(claims):
            return set()
        held = inflight_attempts(conn, group, [d.offset for d in claims])
        return {d.offset for d in claims if held.get(d.offset) != d.attempt}


def inflight_attempts(conn: Connection, group: str, offsets: list[int]) -> dict[int, int]:
    """The attempt of each of these offsets' deliveries that is in flight now."""
    params = {"grp": group, "seqs": offsets}
    return {
        int(r.seq): int(r.attempt)
        for r in conn.execute(bq.select_inflight_attempts, q.params(params))
    }
