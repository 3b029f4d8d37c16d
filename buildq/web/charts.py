"""Small server-rendered SVG charts: no script, no library, nothing fetched by the browser.

Colours come from classes in ``static/app.css`` (the page's Content-Security-Policy allows
no inline styles). Each bar has a ``<title>`` so hovering shows its minute and values.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from markupsafe import Markup, escape

from buildq.orchestrator.sqlstore import TERMINAL

WIDTH = 720
HEIGHT = 160
_LEFT = 44  # room for the y-axis labels
_BOTTOM = 18  # room for the x-axis labels
_TOP = 8


def finished_chart(series: Sequence[dict[str, Any]]) -> Markup:
    """Stacked bars: builds finished per minute, by result."""
    peak = max((sum(point[s] for s in TERMINAL) for point in series), default=0)
    parts = []
    for index, point in enumerate(series):
        y: float = HEIGHT - _BOTTOM
        title = f"{_clock(point['minute_ms'])} UTC: " + ", ".join(
            f"{point[s]} {s.lower()}" for s in TERMINAL
        )
        bars = []
        for status in TERMINAL:
            height = _scale(point[status], peak)
            if height:
                y -= height
                bars.append(_rect(index, len(series), y, height, f"bar-{status.lower()}"))
        parts.append(f"<g><title>{escape(title)}</title>{''.join(bars)}</g>")
    legend = " ".join(s.lower() for s in TERMINAL)
    return _svg(
        "builds finished per minute (" + legend + ")",
        series,
        peak,
        str(peak),
        "".join(parts),
    )


def lateness_chart(series: Sequence[dict[str, Any]]) -> Markup:
    """Per minute: the latest poll (light bar) and the mean (dark bar), in seconds."""
    peak = max((point["max_ms"] or 0 for point in series), default=0)
    parts = []
    for index, point in enumerate(series):
        if not point["polls"]:
            continue
        title = (
            f"{_clock(point['minute_ms'])} UTC: {point['polls']} polls, "
            f"mean {_seconds(point['mean_ms'])} late, max {_seconds(point['max_ms'])}"
        )
        worst = _scale(point["max_ms"], peak)
        mean = _scale(point["mean_ms"], peak)
        base = HEIGHT - _BOTTOM
        parts.append(
            f"<g><title>{escape(title)}</title>"
            + _rect(index, len(series), base - worst, worst, "bar-max")
            + _rect(index, len(series), base - mean, mean, "bar-mean")
            + "</g>"
        )
    return _svg(
        "poll lateness per minute (mean, max)", series, peak, _seconds(peak), "".join(parts)
    )


def _svg(label: str, series: Sequence[dict[str, Any]], peak: int, top: str, body: str) -> Markup:
    base = HEIGHT - _BOTTOM
    first = _clock(series[0]["minute_ms"]) if series else ""
    last = _clock(series[-1]["minute_ms"]) if series else ""
    axis = (
        f'<line class="axis" x1="{_LEFT}" y1="{base}" x2="{WIDTH}" y2="{base}"/>'
        f'<line class="grid" x1="{_LEFT}" y1="{_TOP}" x2="{WIDTH}" y2="{_TOP}"/>'
        f'<text class="label" x="{_LEFT - 4}" y="{_TOP + 4}" text-anchor="end">'
        f"{escape(top if peak else '0')}</text>"
        f'<text class="label" x="{_LEFT}" y="{HEIGHT - 4}">{escape(first)}</text>'
        f'<text class="label" x="{WIDTH}" y="{HEIGHT - 4}" text-anchor="end">'
        f"{escape(last)} UTC</text>"
    )
    return Markup(
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>{axis}{body}</svg>"
    )


def _rect(index: int, count: int, y: float, height: float, css: str) -> str:
    step = (WIDTH - _LEFT) / max(count, 1)
    x = _LEFT + index * step
    return (
        f'<rect class="{css}" x="{x:.1f}" y="{y:.1f}" '
        f'width="{max(step - 1.5, 1):.1f}" height="{height:.1f}"/>'
    )


def _scale(value: float | None, peak: float) -> float:
    if not value or not peak:
        return 0.0
    return max(1.0, (HEIGHT - _BOTTOM - _TOP) * value / peak)


def _clock(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%H:%M")


def _seconds(ms: float | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms:.0f}ms"
    return f"{ms / 1000:.1f}s" if ms < 60_000 else f"{ms / 60_000:.1f}m"
