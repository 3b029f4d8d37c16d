from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from buildq.queue.settings import Backoff, SubscriptionSettings
from buildq.queue.sql import SqlQueue, SqlSubscription
from buildq.storage.database import Database

FAST = SubscriptionSettings(
    slots=8,
    lease_duration_ms=2_000,
    renew_interval_ms=200,
    heartbeat_stale_ms=2_000,
    visibility_timeout_ms=30_000,
    max_attempts=3,
    backoff=Backoff(initial_ms=10, multiplier=2.0, cap_ms=100, jitter=0.0),
    poll_interval_ms=20,
    batch_size=32,
)


@pytest.fixture
def queue(db: Database) -> Iterator[SqlQueue]:
    q = SqlQueue(db)
    yield q
    q.close()


@pytest.fixture
def subscribe(queue: SqlQueue) -> Iterator[Callable[..., SqlSubscription]]:
    opened: list[SqlSubscription] = []

    def _subscribe(
        topic: str, group: str = "g", settings: SubscriptionSettings = FAST, **kw: object
    ) -> SqlSubscription:
        sub = queue.subscribe(topic, group, settings, **kw)  # type: ignore[arg-type]
        opened.append(sub)
        return sub

    yield _subscribe
    for sub in opened:
        with contextlib.suppress(Exception):
            sub.close()
