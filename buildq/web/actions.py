"""What the page may change: cancel a build, requeue or purge dead letters.

The same operations as ``buildq cancel`` and ``buildq dlq requeue|purge``, through the same
stores. Each is logged once (``web_action``) with who asked (the client address; never a
token or cookie) and what came of it; refusals are logged as ``web_action_refused``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import structlog

from buildq.builds import Builds
from buildq.queue.sql.admin import DeadLetterFilter, original_topic
from buildq.storage.database import Database
from buildq.web.views import admin_of

log = structlog.get_logger("buildq.web")


@dataclass(frozen=True)
class DeadLetterTarget:
    """Which dead letters of ``topic`` (the original topic's name) an action is for: one
    letter (id, partition and group), or every letter matching ``error_contains`` when
    ``everything`` is set. Anything else is refused, so a half-filled form never widens."""

    topic: str
    message_id: str | None = None
    partition_key: str | None = None
    group: str | None = None
    error_contains: str | None = None
    everything: bool = False

    def problem(self) -> str | None:
        if not self.topic:
            return "a topic is required"
        one = self.message_id and self.partition_key and self.group
        if not one and not self.everything:
            return "name one dead letter (id, partition and group) or ask for all"
        return None

    def where(self) -> DeadLetterFilter:
        return DeadLetterFilter(
            message_id=self.message_id,
            partition_key=self.partition_key,
            group=self.group,
            error_contains=self.error_contains,
        )

    def for_log(self) -> dict[str, Any]:
        return {
            "topic": original_topic(self.topic),
            "message_id": self.message_id,
            "partition_key": self.partition_key,
            "group": self.group,
            "error_contains": self.error_contains,
            "all": self.everything,
        }


def cancel(db: Database, ident: str, *, client: str) -> dict[str, Any]:
    """Ask for cancellation as ``buildq cancel`` does; the poll loop tells the runner."""
    cancellation = Builds(db).cancel(ident)
    build_id = None if cancellation.build is None else cancellation.build.build_id
    outcome = cancellation.outcome.value
    log.info(
        "web_action", action="cancel", id=ident, build_id=build_id, outcome=outcome, client=client
    )
    return {"id": ident, "build_id": build_id, "outcome": outcome}


def requeue(db: Database, target: DeadLetterTarget, *, client: str) -> dict[str, Any]:
    """``buildq dlq requeue``: the same result shape as its ``--json``."""
    result = admin_of(db).requeue(original_topic(target.topic), target.where())
    log.info(
        "web_action",
        action="dlq_requeue",
        **target.for_log(),
        requeued=len(result.requeued),
        gone=len(result.gone),
        failed=len(result.failed),
        client=client,
    )
    return {
        "dry_run": False,
        "requeued": result.requeued,
        "gone": result.gone,
        "failed": result.failed,
    }


def purge(db: Database, target: DeadLetterTarget, *, client: str) -> dict[str, Any]:
    """``buildq dlq purge``: ``{"deleted": n}``."""
    deleted = admin_of(db).purge_dead_letters(original_topic(target.topic), target.where())
    log.info("web_action", action="dlq_purge", **target.for_log(), deleted=deleted, client=client)
    return {"deleted": deleted}


def refused(action: str, reason: str, *, client: str) -> None:
    log.warning("web_action_refused", action=action, reason=reason, client=client)
