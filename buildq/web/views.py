"""The builds and queue pages' data: plain dicts, the same for HTML and for ``/api/…``.

Where the CLI has a ``--json`` for the same thing, the shape is the CLI's (``Build.to_json``,
``QueueAdmin`` rows); a test holds the two together.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from buildq.orchestrator import topics
from buildq.orchestrator.model import Build
from buildq.orchestrator.sqlstore import LIVE, TERMINAL, SqlBuildStore
from buildq.orchestrator.sqlviews import BuildViews
from buildq.queue.contract import message_id
from buildq.queue.sql import admin_queries as aq
from buildq.queue.sql import queries as q
from buildq.queue.sql.admin import DeadLetterFilter, QueueAdmin
from buildq.queue.sql.messages import MessageStore
from buildq.queue.sql.stats import TopicStats
from buildq.storage.database import Database

#: Most live builds one page lists (the overview counts them all).
IN_FLIGHT_SHOWN = 200
RESULTS_PAGE = 50
POLLS_SHOWN = 500
DEAD_LETTERS_SHOWN = 100
STALE_AFTER_MS = 30_000


@dataclass(frozen=True)
class BuildFilter:
    """The builds page's filters; empty strings from a form mean "any"."""

    queue: str | None = None
    status: str | None = None
    reason: str | None = None
    text: str | None = None
    before: tuple[int, str] | None = None


def admin_of(db: Database) -> QueueAdmin:
    return QueueAdmin(db, MessageStore(db))


def in_flight(db: Database, where: BuildFilter) -> list[Build]:
    if where.reason or (where.status and where.status not in LIVE):
        return []  # a failure reason or a final status: nothing in flight has one
    statuses = [where.status] if where.status else LIVE
    return BuildViews(db).browse(
        statuses, queue=where.queue, text=where.text, limit=IN_FLIGHT_SHOWN
    )


def results(db: Database, where: BuildFilter) -> list[Build]:
    if where.status and where.status not in TERMINAL:
        return []  # a live status: no result has it
    statuses = [where.status] if where.status else TERMINAL
    return BuildViews(db).browse(
        statuses,
        queue=where.queue,
        reason=where.reason,
        text=where.text,
        before=where.before,
        limit=RESULTS_PAGE,
    )


def build_detail(db: Database, ident: str) -> dict[str, Any] | None:
    """A build with its request, timeline, result message and dead letters; None if unknown."""
    store = SqlBuildStore(db)
    build = store.get(ident)
    if build is None:
        return None
    admin = admin_of(db)
    requests = admin.messages(topics.BUILD, partition_key=build.request_id, limit=5)
    polls = []
    if build.build_id is not None:
        polls = admin.messages(topics.BUILDSIGNAL, partition_key=build.build_id, limit=POLLS_SHOWN)
    result = _result_message(db, build)
    letters = [
        letter | {"topic": topic}
        for topic, key in ((topics.BUILD, build.request_id), (topics.BUILDSIGNAL, build.build_id))
        if key is not None
        for letter in admin.dead_letters(topic, DeadLetterFilter(partition_key=key), limit=20)
    ]
    return {
        "build": build.to_json(),
        "now_ms": store.now_ms(),
        "timeline": timeline(build, list(reversed(polls)), requests, result),
        "polls_shown": len(polls),
        "result_message": result,
        "dead_letters": letters,
    }


def _result_message(db: Database, build: Build) -> dict[str, Any] | None:
    """The ``buildresult`` message as published, while the log retains it."""
    if not build.is_terminal:
        return None
    params = q.params(
        {
            "topic": topics.BUILDRESULT,
            "partition_key": build.request_id,
            "message_id": message_id(build.request_id, "result"),
        }
    )
    row = db.read(lambda c: c.execute(aq.select_partition_message, params).mappings().first())
    if row is None:
        return {"retained": False, "created_at_ms": None, "payload": None}
    raw = bytes(row["payload"])
    try:
        payload: Any = json.loads(raw.decode("utf-8"))
    except ValueError:  # not the daemon's JSON: show it as text
        payload = raw.decode("utf-8", "replace")
    return {"retained": True, "created_at_ms": row["created_at_ms"], "payload": payload}


def timeline(
    build: Build,
    polls: Sequence[dict[str, Any]],
    requests: Sequence[dict[str, Any]],
    result: dict[str, Any] | None,
) -> list[dict[str, Any]]:
    """What happened to a build, oldest first: ``{"at_ms", "event", "detail", "late_ms"}``.

    Poll n was done when poll n+1 was published (the same transaction), the last one when the
    build finished; each poll's lateness is that minus when it was due."""
    events: list[dict[str, Any]] = []

    def add(at: int | None, event: str, detail: str = "", late: int | None = None) -> None:
        if at is not None:
            events.append({"at_ms": at, "event": event, "detail": detail, "late_ms": late})

    for request in requests:
        add(request["created_at_ms"], "submitted", f"message {request['message_id']}")
    add(build.created_at_ms, "triggered", f"runner {build.runner} accepted it as ACCEPTED")
    started = _iso_ms(build.metadata.get("started_at"))
    add(started, "running", "started_at reported by the runner")
    for index, poll in enumerate(polls):
        due = max(int(poll["visible_after_ms"]), int(poll["created_at_ms"]))
        done = (
            polls[index + 1]["created_at_ms"]
            if index + 1 < len(polls)
            else build.finished_at_ms
            if build.is_terminal
            else None
        )
        if done is None:
            add(due, "poll due", f"{poll['message_id']} (not done yet)")
        else:
            add(int(done), "polled", str(poll["message_id"]), max(0, int(done) - due))
    add(build.cancel_requested_at_ms, "cancel requested")
    add(build.cancel_sent_at_ms, "cancel sent", "the runner was asked to cancel")
    reason = f" ({build.failure_reason})" if build.failure_reason else ""
    add(build.finished_at_ms, "finished", build.status + reason)
    if result is not None and result["retained"]:
        add(result["created_at_ms"], "result published", f"on {topics.BUILDRESULT}")
    events.sort(key=lambda e: int(e["at_ms"]))
    return events


def _iso_ms(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)
    except ValueError:
        return None  # a runner's own format: shown in the metadata, not placed on the timeline


def topic_json(stats: TopicStats) -> dict[str, Any]:
    """One topic as ``buildq queue topics --json`` prints it."""
    return {
        "topic": stats.topic,
        "messages": stats.messages,
        "dead_letters": stats.dead_letters,
        "groups": [dataclasses.asdict(g) for g in stats.groups],
    }


def queue_view(db: Database) -> dict[str, Any]:
    admin = admin_of(db)
    stats = admin.topic_stats()
    leases = admin.leases()
    members = db.read(lambda c: [dict(r) for r in c.execute(aq.select_members).mappings()])
    letters = {
        topic: admin.dead_letters(topic, limit=DEAD_LETTERS_SHOWN)
        for topic in sorted({s.topic for s in stats if s.dead_letters})
    }
    return {
        "topics": [topic_json(s) for s in stats],
        "leases": leases,
        "lease_holders": _lease_holders(leases),
        "members": [m | {"silent": m["silent_for_ms"] >= STALE_AFTER_MS} for m in members],
        "dead_letters": letters,
        "retrying": {
            topic: _retrying(db, topic)
            for topic in (
                topics.BUILD,
                topics.BUILDSIGNAL,
                topics.BUILD_DLQ,
                topics.BUILDSIGNAL_DLQ,
            )
        },
    }


def _retrying(db: Database, topic: str) -> list[dict[str, Any]]:
    params = q.params({"topic": topic, "limit": 20})
    return db.read(
        lambda c: [dict(r) for r in c.execute(aq.select_retrying_deliveries, params).mappings()]
    )


def _lease_holders(leases: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Slots per (topic, group, owner, state): who holds how much of each group."""
    counts: dict[tuple[str, str, str, str], int] = defaultdict(int)
    for lease in leases:
        counts[(lease["topic"], lease["group"], lease["owner"] or "", lease["state"])] += 1
    return [
        {"topic": t, "group": g, "owner": o or None, "state": s, "slots": n}
        for (t, g, o, s), n in sorted(counts.items())
    ]
