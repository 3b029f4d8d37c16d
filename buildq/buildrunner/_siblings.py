"""CI settings that cancel buildq's builds against each other, as ``buildq doctor`` finds them.

Every build buildq starts on a runner runs on the same branch (Buildkite) or ref (GitHub), so a
setting that keeps only "the newest build of a branch" cancels merge-queue builds that are all
meant to finish: Buildkite's *Cancel Intermediate Builds* and *Skip Intermediate Builds*, and a
GitHub ``concurrency`` group that is not unique per run (a shared group keeps one run going
and cancels the older pending one; ``cancel-in-progress`` cancels the running one too).
docs/ci-runners.md ("Sibling builds") says how to configure around them.

The functions here only read what the vendor's API shows; the runners fetch it.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

#: What in a GitHub concurrency group makes it unique per buildq build.
_UNIQUE_PER_RUN = ("buildq_request_id", "github.run_id")


@dataclass(frozen=True, slots=True)
class Concurrency:
    """One ``concurrency`` setting of a workflow (its own level or a job's)."""

    where: str  # "workflow" or "job <id>"
    group: str
    cancel_in_progress: str  # "false", "true" or an expression


def buildkite_warnings(pipeline: Mapping[str, Any], branch: str) -> list[str]:
    """What of a pipeline's build settings cancels or skips buildq's builds on ``branch``."""
    found = []
    settings = (
        ("skip_queued_branch_builds", "Skip Intermediate Builds", "skips queued builds"),
        ("cancel_running_branch_builds", "Cancel Intermediate Builds", "cancels running builds"),
    )
    for key, label, effect in settings:
        if pipeline.get(key) is True and branch_matches(pipeline.get(f"{key}_filter"), branch):
            found.append(
                f"{label} is on for branch {branch!r}: Buildkite {effect} of the branch when a "
                "newer build comes, so buildq's builds cancel each other (reported CANCELLED)"
            )
    return found


def branch_matches(branch_filter: object, branch: str) -> bool:
    """Buildkite's branch filter: empty means every branch; space-separated patterns with
    ``*``; ``!pattern`` excludes."""
    if not isinstance(branch_filter, str) or not branch_filter.strip():
        return True
    patterns = branch_filter.split()
    if any(fnmatch.fnmatchcase(branch, p[1:]) for p in patterns if p.startswith("!")):
        return False
    included = [p for p in patterns if not p.startswith("!")]
    return not included or any(fnmatch.fnmatchcase(branch, p) for p in included)


def github_warnings(workflow: str) -> list[str]:
    """What ``concurrency`` in a workflow file cancels buildq's runs of it."""
    found = []
    for setting in concurrency_settings(workflow):
        if any(marker in setting.group for marker in _UNIQUE_PER_RUN):
            continue
        if setting.cancel_in_progress == "false":
            found.append(
                f"the {setting.where} concurrency group {setting.group!r} lets one run at a "
                "time and cancels the older pending one when another is queued"
            )
        else:
            found.append(
                f"the {setting.where} concurrency group {setting.group!r} has cancel-in-progress: "
                f"{setting.cancel_in_progress}: a newer run cancels the running one"
            )
    return found


_KEY = re.compile(r"^(?P<indent>\s*)(?P<key>[A-Za-z0-9_-]+):\s*(?P<value>.*?)\s*(?:#.*)?$")


def concurrency_settings(workflow: str) -> list[Concurrency]:
    """The ``concurrency`` keys of a workflow file, read line by line (no YAML parser: only
    the block and scalar forms GitHub documents are understood)."""
    lines = [
        line for line in workflow.splitlines() if line.strip() and not line.lstrip().startswith("#")
    ]
    found, job = [], ""
    for index, line in enumerate(lines):
        match = _KEY.match(line)
        if match is None:
            continue
        indent = len(match["indent"])
        if indent and _parent(lines, index, indent) == "jobs:":
            job = match["key"]
        if match["key"] != "concurrency":
            continue
        where = "workflow" if indent == 0 else f"job {job!r}"
        if match["value"]:  # concurrency: <group>
            found.append(Concurrency(where, _unquote(match["value"]), "false"))
            continue
        block = _block(lines, index, indent)
        found.append(
            Concurrency(
                where, block.get("group", ""), block.get("cancel-in-progress", "false").lower()
            )
        )
    return found


def _parent(lines: list[str], index: int, indent: int) -> str:
    """The line a key at ``indent`` belongs to (the nearest one above, indented less)."""
    for line in reversed(lines[:index]):
        if len(line) - len(line.lstrip()) < indent:
            return line.strip()
    return ""


def _block(lines: list[str], index: int, indent: int) -> dict[str, str]:
    block: dict[str, str] = {}
    for line in lines[index + 1 :]:
        match = _KEY.match(line)
        if match is None or len(match["indent"]) <= indent:
            break
        block[match["key"]] = _unquote(match["value"])
    return block


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value
