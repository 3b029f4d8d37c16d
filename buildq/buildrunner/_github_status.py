"""A GitHub Actions run attempt in buildq's terms: its status and its metadata.

``status``/``conclusion`` map as the table in docs/ci-runners.md ("GitHub state mapping")
says; the raw values stay in ``native_state``/``native_conclusion``. Used by ``github``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from buildq.buildrunner import _http_runner
from buildq.buildrunner.contract import BuildMetadata, BuildStatus

_ACCEPTED = frozenset({"requested", "queued", "pending", "waiting"})
_FAILED_REASON: Mapping[str, str] = {
    "failure": "verdict",
    "neutral": "verdict",
    "skipped": "verdict",
    "stale": "verdict",
    "action_required": "verdict",
    "timed_out": "timeout",
    "startup_failure": "infra",
}


def map_status(run: Mapping[str, Any]) -> tuple[BuildStatus, BuildMetadata]:
    """A run attempt's ``status``/``conclusion`` in buildq's terms (raw values kept)."""
    state, conclusion = str(run.get("status", "")), run.get("conclusion")
    meta = _metadata(run)
    meta["native_state"] = state
    if isinstance(conclusion, str):
        meta["native_conclusion"] = conclusion
    if state in _ACCEPTED:
        return BuildStatus.ACCEPTED, meta
    if state == "in_progress":
        return BuildStatus.RUNNING, meta
    if state != "completed":
        return BuildStatus.UNKNOWN, meta
    if conclusion == "success":
        return BuildStatus.SUCCEEDED, meta
    if conclusion == "cancelled":
        return BuildStatus.CANCELLED, meta
    if isinstance(conclusion, str) and conclusion in _FAILED_REASON:
        meta["failure_reason"] = _FAILED_REASON[conclusion]
        return BuildStatus.FAILED, meta
    return BuildStatus.UNKNOWN, meta


def _metadata(run: Mapping[str, Any]) -> BuildMetadata:
    meta: BuildMetadata = {}
    for key, source in (
        ("url", "html_url"),
        ("sha", "head_sha"),
        ("branch", "head_branch"),
        ("title", "display_title"),
    ):
        value = run.get(source)
        if isinstance(value, str) and value:
            meta[key] = value
    for key in ("id", "run_attempt"):
        if isinstance(run.get(key), int):
            meta["run_id" if key == "id" else key] = str(run[key])
    # A completed run is not touched again, so its last update is when it finished.
    finished = run.get("updated_at") if run.get("status") == "completed" else None
    meta.update(_http_runner.time_metadata(run.get("run_started_at"), finished))
    return meta
