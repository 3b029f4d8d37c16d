"""``buildq watch``: in-flight builds and the latest finished ones, updated in place."""

from __future__ import annotations

import time

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from buildq.buildrunner import BuildStatus
from buildq.orchestrator.model import Build
from buildq.orchestrator.sqlstore import SqlBuildStore

_STYLE = {
    BuildStatus.ACCEPTED.value: "yellow",
    BuildStatus.RUNNING.value: "cyan",
    BuildStatus.SUCCEEDED.value: "green",
    BuildStatus.FAILED.value: "red",
    BuildStatus.CANCELLED.value: "magenta",
    BuildStatus.UNKNOWN.value: "bold red",
}


def _age(now_ms: int, then_ms: int | None) -> str:
    if then_ms is None:
        return "-"
    seconds = (now_ms - then_ms) / 1000
    return f"{seconds:.0f}s" if abs(seconds) < 120 else f"{seconds / 60:.1f}m"


def render(store: SqlBuildStore, recent: int = 10) -> Group:
    now = store.now_ms()
    live = store.in_flight(limit=200)
    done = [b for b in store.list_builds(limit=50) if b.is_terminal][:recent]
    table = Table(title=f"in flight: {len(live)}", expand=True)
    for column in ("build", "queue", "status", "age", "polls", "next poll", "url"):
        table.add_column(column)
    for build in live:
        table.add_row(*_row(build, now))
    finished = Table(title="recently finished", expand=True)
    for column in ("build", "queue", "status", "reason", "took", "polls"):
        finished.add_column(column)
    for build in done:
        took = _age(build.finished_at_ms or now, build.created_at_ms)
        finished.add_row(
            Text(build.build_id or build.request_id),
            Text(build.queue),
            Text(build.status, style=_STYLE.get(build.status, "")),
            Text(build.failure_reason or ""),
            took,
            str(build.polls),
        )
    return Group(table, finished)


def _row(build: Build, now: int) -> tuple[str | Text, ...]:
    # Values from requests and runners are Text, never markup: "[/]" in a request id is text.
    next_poll = "-"
    if build.next_poll_at_ms is not None:
        next_poll = f"in {max(0, build.next_poll_at_ms - now) / 1000:.1f}s"
    status = build.status + (" (cancelling)" if build.cancel_requested_at_ms else "")
    return (
        Text(build.build_id or build.request_id),
        Text(build.queue),
        Text(status, style=_STYLE.get(build.status, "")),
        _age(now, build.created_at_ms),
        str(build.polls),
        next_poll,
        Text(build.metadata.get("url", "")),
    )


def watch(store: SqlBuildStore, interval_s: float, *, once: bool = False) -> int:
    console = Console()
    if once or not console.is_terminal:
        console.print(render(store))
        return 0
    with Live(render(store), console=console, refresh_per_second=4, screen=False) as live:
        while True:
            time.sleep(interval_s)
            live.update(render(store))
