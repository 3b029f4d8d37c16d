"""The queue's numbers as an operator and the metrics see them: per topic, per group.

``fold_stats`` turns the rows of one aggregate query (``stats_queries``) into these values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from buildq.queue.contract import DLQ_SUFFIX, is_dlq_topic


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One consumer group's view of a topic. ``slots`` is None for a group that is not
    registered on the topic (it only left dead letters)."""

    group: str
    slots: int | None = None
    pending: int = 0  # deliveries not yet acked: ready + delayed + in flight
    ready: int = 0
    delayed: int = 0
    in_flight: int = 0
    oldest_ready_age_ms: int | None = None
    max_retry_count: int = 0
    dead_letters: int = 0


@dataclass(frozen=True, slots=True)
class TopicStats:
    topic: str
    messages: int | None = 0  # None: not counted (see QueueAdmin.topic_stats)
    groups: tuple[GroupStats, ...] = ()

    @property
    def dead_letters(self) -> int:
        return sum(group.dead_letters for group in self.groups)


def int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def fold_stats(rows: list[dict[str, Any]], *, counted: bool) -> list[TopicStats]:
    """Turn the aggregate's rows into one TopicStats per topic (``stats_queries._topic_stats``)."""
    topics: dict[str, TopicStats] = {}
    groups: dict[tuple[str, str], GroupStats] = {}
    empty = 0 if counted else None

    def group_of(topic: str, name: str) -> GroupStats:
        topics.setdefault(topic, TopicStats(topic, empty))
        return groups.setdefault((topic, name), GroupStats(name))

    for row in rows:
        topic, name, total = row["topic"], row["grp"], int(row["total"])
        if row["kind"] == "group":
            groups[(topic, name)] = replace(group_of(topic, name), slots=total)
        elif row["kind"] == "pending":
            groups[(topic, name)] = replace(
                group_of(topic, name),
                pending=total,
                ready=int(row["ready"]),
                delayed=int(row["delayed"]),
                in_flight=int(row["in_flight"]),
                oldest_ready_age_ms=int_or_none(row["oldest_ready_age_ms"]),
                max_retry_count=int(row["max_retry_count"]),
            )
        else:
            current = topics.setdefault(topic, TopicStats(topic, empty))
            topics[topic] = replace(current, messages=(current.messages or 0) + total)
            if is_dlq_topic(topic) and name:
                original = topic.removesuffix(DLQ_SUFFIX)
                failed = group_of(original, name)
                groups[(original, name)] = replace(failed, dead_letters=failed.dead_letters + total)
    by_topic: dict[str, list[GroupStats]] = {}
    for (topic, _), stats in sorted(groups.items()):
        by_topic.setdefault(topic, []).append(stats)
    return [replace(topics[name], groups=tuple(by_topic.get(name, ()))) for name in sorted(topics)]
