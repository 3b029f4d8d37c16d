"""Poll cadence and deadlines: when to look at a build next, and when to give up on it."""

from __future__ import annotations

import random

from buildq.buildrunner import BuildStatus
from buildq.config import PollPolicy


def next_poll_delay_ms(
    policy: PollPolicy,
    status: BuildStatus,
    polls: int,
    *,
    webhooks: bool = False,
    rng: random.Random | None = None,
) -> int:
    """Delay before poll number ``polls + 1``: per-status base, grown with age, capped, jittered.

    With webhooks on, the runner tells us when a build changes; polling is only the safety net.
    """
    if webhooks:
        base_s = policy.webhook_safety_interval_s
    else:
        base_s = (
            policy.accepted_interval_s
            if status is BuildStatus.ACCEPTED
            else policy.running_interval_s
        )
        base_s = min(policy.max_interval_s, base_s * policy.growth ** max(0, polls - 1))
    spread = base_s * policy.jitter
    delay_s = (rng or random).uniform(base_s - spread, base_s + spread) if spread else base_s
    return max(1, int(delay_s * 1000))


def first_poll_delay_ms(policy: PollPolicy) -> int:
    # A fresh build is almost never done at once; the first look waits the accepted interval.
    return max(1, int(policy.accepted_interval_s * 1000))


def deadline_passed(
    policy: PollPolicy, created_at_ms: int, status: BuildStatus, now_ms: int
) -> str | None:
    """Which deadline a build triggered at ``created_at_ms`` and now in ``status`` has missed
    at ``now_ms`` (database clock), if any."""
    age_s = (now_ms - created_at_ms) / 1000
    if policy.finish_by_s and age_s >= policy.finish_by_s:
        return f"not finished within finish_by_s={policy.finish_by_s:g}"
    if policy.start_by_s and status is BuildStatus.ACCEPTED and age_s >= policy.start_by_s:
        return f"not started within start_by_s={policy.start_by_s:g}"
    return None


def until_next_deadline_ms(
    policy: PollPolicy, created_at_ms: int, status: BuildStatus, now_ms: int
) -> int | None:
    """Milliseconds to the next deadline that applies to a build in ``status``."""
    candidates = []
    if policy.finish_by_s:
        candidates.append(created_at_ms + int(policy.finish_by_s * 1000))
    if policy.start_by_s and status is BuildStatus.ACCEPTED:
        candidates.append(created_at_ms + int(policy.start_by_s * 1000))
    return max(1, min(candidates) - now_ms) if candidates else None
