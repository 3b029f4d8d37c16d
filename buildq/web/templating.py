"""Jinja2 for the pages: every template autoescaped, undefined names an error, and the few
filters that turn stored values into text (times in UTC, durations, safe CI links)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit

from jinja2 import Environment, PackageLoader, StrictUndefined

from buildq.orchestrator.sqlstore import LIVE, TERMINAL
from buildq.web import charts


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("buildq.web", "templates"),
        # Everything, whatever the file name: a request id or change name is never markup.
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        clock=clock,
        age=age,
        ci_link=ci_link,
        pretty=pretty,
        qs=query_value,
    )
    env.globals.update(
        live_statuses=LIVE,
        terminal_statuses=TERMINAL,
        finished_chart=charts.finished_chart,
        lateness_chart=charts.lateness_chart,
    )
    return env


def clock(epoch_ms: int | None, seconds: bool = True) -> str:
    """``2026-11-27 19:25:42`` (UTC); ``-`` for none."""
    if not epoch_ms:
        return "-"
    moment = datetime.fromtimestamp(epoch_ms / 1000, UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def age(ms: int | float | None) -> str:
    """A duration for a person: ``850ms``, ``42s``, ``3m 12s``, ``5h 02m``, ``2d 3h``."""
    if ms is None:
        return "-"
    value = int(ms)
    sign, value = ("-" if value < 0 else ""), abs(value)
    if value < 1000:
        return f"{sign}{value}ms"
    seconds = value // 1000
    if seconds < 60:
        return f"{sign}{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{sign}{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{sign}{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{sign}{days}d {hours}h"


def ci_link(url: object) -> str | None:
    """The runner's URL if it is http(s), else None: a ``javascript:`` URL in runner
    metadata must never become a link."""
    if not isinstance(url, str):
        return None
    try:
        scheme = urlsplit(url.strip()).scheme.lower()
    except ValueError:
        return None
    return url.strip() if scheme in ("http", "https") else None


def pretty(value: Any) -> str:
    """JSON for a ``<pre>`` block (escaped by the template like any other text)."""
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def query_value(value: object) -> str:
    """One value for a query string: everything but unreserved characters percent-encoded."""
    return quote(str(value), safe="")
