"""The overview: per queue and per runner, the last hour at a glance, from the database only.

Every figure comes from a handful of aggregate queries (``BuildViews``, ``admin_queries``), so
the cost of a page does not grow with the number of finished builds. Poll lateness, the only
figure that reads the message log, is kept per minute (``LatenessMinutes``): a finished minute
never changes, so each refresh reads only the polls done since the last one it kept.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from buildq.buildrunner import BuildStatus
from buildq.config import Config
from buildq.orchestrator import topics
from buildq.orchestrator.lateness import poll_lateness
from buildq.orchestrator.sqlstore import LIVE, TERMINAL, SqlBuildStore
from buildq.orchestrator.sqlviews import MINUTE_MS, BuildViews
from buildq.queue.sql import admin_queries as aq
from buildq.queue.sql import queries as q
from buildq.queue.sql.admin import QueueAdmin
from buildq.queue.sql.messages import MessageStore
from buildq.storage.database import Database

HOUR_MS = 3_600_000
#: A live build whose next poll is this much past due counts as overdue (a poll takes a runner
#: call and a commit, so a few seconds late is normal).
OVERDUE_GRACE_MS = 30_000
#: A daemon whose heartbeat is older than this is shown as silent.
SILENT_AFTER_MS = 30_000
#: Failure reasons that point at the runner or the CI service rather than the change.
RUNNER_TROUBLE = ("infra", "lost", "timeout")
_RETRYING_SHOWN = 200


class LatenessMinutes:
    """Poll lateness per minute, each finished minute read from the database once.

    A poll done in minute m is committed with ``created_at`` (database clock) in m, so once m
    is over its row is final. A refresh asks only for the minutes since the newest one kept
    (the builds polled since, not the hour's), and at most once per ``ttl_s``: many open
    pages cost the database what one does.
    """

    def __init__(self, ttl_s: float) -> None:
        self._ttl_s = ttl_s
        self._done: dict[int, dict[str, Any]] = {}
        self._last: tuple[float, int, list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()

    def read(self, db: Database, since: int, now: int) -> list[dict[str, Any]]:
        with self._lock:
            last = self._last
        if last is not None and last[1] == since and time.monotonic() - last[0] < self._ttl_s:
            return last[2]
        found = self._read(db, since, now)
        with self._lock:
            self._last = (time.monotonic(), since, found)
        return found

    def _read(self, db: Database, since: int, now: int) -> list[dict[str, Any]]:
        current = _minute(now)
        with self._lock:
            kept = {m: row for m, row in self._done.items() if m >= since}
            first_missing = max((m + MINUTE_MS for m in kept), default=since)
        rows = poll_lateness(db, first_missing)
        fresh = {
            int(row["minute_ms"]): row for row in rows if int(row["minute_ms"]) >= first_missing
        }
        with self._lock:
            # Minutes with no polls are final too: remember them as empty.
            for minute in range(first_missing, current, MINUTE_MS):
                self._done[minute] = fresh.get(minute, {"minute_ms": minute, "polls": 0})
            self._done = {m: row for m, row in self._done.items() if m >= since}
        return [row for m, row in sorted({**kept, **fresh}.items()) if row["polls"]]


@dataclass
class Overview:
    db: Database
    config: Config
    lateness: LatenessMinutes

    def read(self) -> dict[str, Any]:
        views = BuildViews(self.db)
        admin = QueueAdmin(self.db, MessageStore(self.db))
        now = SqlBuildStore(self.db).now_ms()
        since = _minute(now) - HOUR_MS + MINUTE_MS
        live = views.live_polls(OVERDUE_GRACE_MS)
        finished = views.finished_since(since)
        lateness = self.lateness.read(self.db, since, now)
        retrying = _rows(
            self.db, aq.select_retrying_deliveries, topic=topics.BUILDSIGNAL, limit=_RETRYING_SHOWN
        )
        letters = _dead_letter_keys(admin)
        queue_of = views.queues_of([*letters, *(r["partition_key"] for r in retrying)])
        queues = self._queues(live, finished, letters, queue_of)
        return {
            "now_ms": now,
            "since_ms": since,
            "queues": queues,
            "runners": self._runners(queues, retrying, queue_of),
            "daemons": _daemons(_rows(self.db, aq.select_members)),
            "dead_letters": _dead_letter_totals(admin),
            "finished_per_minute": _finished_series(finished, since, now),
            "poll_lateness_per_minute": _lateness_series(lateness, since, now),
        }

    def _queues(
        self,
        live: list[dict[str, Any]],
        finished: list[dict[str, Any]],
        letters: list[str],
        queue_of: Mapping[str, str],
    ) -> list[dict[str, Any]]:
        names = sorted(
            {*self.config.queues, *(r["queue"] for r in live), *(r["queue"] for r in finished)}
        )
        out = {name: _empty_queue(name, self._runner_of(name)) for name in names}
        for row in live:
            entry = out[row["queue"]]
            entry["in_flight"][row["status"]] = int(row["builds"])
            entry["oldest_in_flight_age_ms"] = _max(entry["oldest_in_flight_age_ms"], row)
            entry["overdue_polls"] += int(row["overdue_polls"])
            entry["cancelling"] += int(row["cancelling"])
            overdue = row["most_overdue_ms"]
            if int(row["overdue_polls"]) and overdue is not None:
                entry["most_overdue_ms"] = max(entry["most_overdue_ms"] or 0, int(overdue))
        for row in finished:
            entry = out[row["queue"]]
            entry["finished_last_hour"][row["status"]] += int(row["builds"])
            reason = row["failure_reason"]
            if reason:
                reasons = entry["failure_reasons_last_hour"]
                reasons[reason] = reasons.get(reason, 0) + int(row["builds"])
        for key in letters:
            name = queue_of.get(key)
            if name in out:
                out[name]["dead_letters"] += 1
        for entry in out.values():
            entry["in_flight_total"] = sum(entry["in_flight"].values())
        return list(out.values())

    def _runner_of(self, queue: str) -> str | None:
        configured = self.config.queues.get(queue)
        return configured.runner if configured else None

    def _runners(
        self,
        queues: list[dict[str, Any]],
        retrying: list[dict[str, Any]],
        queue_of: Mapping[str, str],
    ) -> list[dict[str, Any]]:
        runner_of = {entry["queue"]: entry["runner"] for entry in queues}
        out: dict[str, dict[str, Any]] = {}
        for name, table in sorted(self.config.runners.items()):
            kind = table.data.get("type")
            out[name] = _empty_runner(name, kind if isinstance(kind, str) else None)
        for entry in queues:
            runner = out.get(entry["runner"] or "")
            if runner is None:
                continue
            runner["queues"].append(entry["queue"])
            runner["in_flight"] += entry["in_flight_total"]
            runner["unknown_status"] += entry["in_flight"].get(BuildStatus.UNKNOWN.value, 0)
            runner["finished_last_hour"] += sum(entry["finished_last_hour"].values())
            runner["overdue_polls"] += entry["overdue_polls"]
            for reason in RUNNER_TROUBLE:
                runner["trouble_last_hour"][reason] += entry["failure_reasons_last_hour"].get(
                    reason, 0
                )
        for row in retrying:
            runner = out.get(runner_of.get(queue_of.get(row["partition_key"], ""), "") or "")
            if runner is not None:
                runner["retrying_polls"] += 1
                runner["last_error"] = runner["last_error"] or row["last_error"]
        for runner in out.values():
            runner["problems"] = _problems(runner)
            runner["health"] = "degraded" if runner["problems"] else "ok"
        return list(out.values())


def _minute(ms: int) -> int:
    return ms - ms % MINUTE_MS


def _max(current: int | None, row: Mapping[str, Any]) -> int:
    age = int(row["oldest_age_ms"] or 0)
    return age if current is None else max(current, age)


def _rows(db: Database, stmt: Any, **params: Any) -> list[dict[str, Any]]:
    return db.read(lambda c: [dict(r) for r in c.execute(stmt, q.params(params)).mappings()])


def _empty_queue(name: str, runner: str | None) -> dict[str, Any]:
    return {
        "queue": name,
        "runner": runner,
        "in_flight": {status: 0 for status in LIVE},
        "in_flight_total": 0,
        "oldest_in_flight_age_ms": None,
        "overdue_polls": 0,
        "most_overdue_ms": None,
        "cancelling": 0,
        "finished_last_hour": {status: 0 for status in TERMINAL},
        "failure_reasons_last_hour": {},
        "dead_letters": 0,
    }


def _empty_runner(name: str, kind: str | None) -> dict[str, Any]:
    return {
        "runner": name,
        "type": kind,
        "queues": [],
        "in_flight": 0,
        "unknown_status": 0,
        "finished_last_hour": 0,
        "overdue_polls": 0,
        "retrying_polls": 0,
        "last_error": None,
        "trouble_last_hour": {reason: 0 for reason in RUNNER_TROUBLE},
    }


def _problems(runner: Mapping[str, Any]) -> list[str]:
    problems = []
    if runner["retrying_polls"]:
        problems.append(f"{runner['retrying_polls']} poll(s) retrying after an error")
    if runner["overdue_polls"]:
        problems.append(f"{runner['overdue_polls']} poll(s) overdue")
    if runner["unknown_status"]:
        problems.append(f"{runner['unknown_status']} build(s) in a state it cannot map")
    for reason, count in runner["trouble_last_hour"].items():
        if count:
            problems.append(f"{count} build(s) failed as {reason} in the last hour")
    return problems


def _daemons(members: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One line per daemon process (it has a member per topic it consumes)."""
    found: dict[tuple[str, int], dict[str, Any]] = {}
    for member in members:
        key = (member["host"], int(member["pid"]))
        entry = found.setdefault(
            key,
            {"host": key[0], "pid": key[1], "topics": [], "silent_for_ms": None},
        )
        entry["topics"].append(f"{member['topic']} ({member['group']})")
        silent = int(member["silent_for_ms"])
        entry["silent_for_ms"] = (
            silent if entry["silent_for_ms"] is None else min(entry["silent_for_ms"], silent)
        )
    for entry in found.values():
        entry["alive"] = entry["silent_for_ms"] < SILENT_AFTER_MS
    return sorted(found.values(), key=lambda e: (not e["alive"], e["host"], e["pid"]))


def _dead_letter_keys(admin: QueueAdmin) -> list[str]:
    """Partition keys of the build pipeline's dead letters (request ids and build ids)."""
    keys = []
    for topic in (topics.BUILD, topics.BUILDSIGNAL):
        keys += [letter["partition_key"] for letter in admin.dead_letters(topic, limit=1000)]
    return keys


def _dead_letter_totals(admin: QueueAdmin) -> list[dict[str, Any]]:
    return [
        {"topic": stats.topic, "group": group.group, "dead_letters": group.dead_letters}
        for stats in admin.topic_stats(count_messages=False)
        for group in stats.groups
        if group.dead_letters
    ]


def _minutes(since: int, now: int) -> list[int]:
    return list(range(since, _minute(now) + 1, MINUTE_MS))


def _finished_series(rows: list[dict[str, Any]], since: int, now: int) -> list[dict[str, Any]]:
    per_minute: dict[int, dict[str, int]] = defaultdict(lambda: dict.fromkeys(TERMINAL, 0))
    for row in rows:
        per_minute[int(row["minute_ms"])][row["status"]] += int(row["builds"])
    return [{"minute_ms": minute, **per_minute[minute]} for minute in _minutes(since, now)]


def _lateness_series(rows: list[dict[str, Any]], since: int, now: int) -> list[dict[str, Any]]:
    by_minute = {int(row["minute_ms"]): row for row in rows}
    out = []
    for minute in _minutes(since, now):
        row = by_minute.get(minute)
        out.append(
            {
                "minute_ms": minute,
                "polls": int(row["polls"]) if row else 0,
                "mean_ms": round(float(row["mean_ms"])) if row else None,
                "max_ms": int(row["max_ms"]) if row else None,
            }
        )
    return out
