"""CI settings that cancel buildq's builds against each other, as ``buildq doctor`` finds them.

Every build buildq starts on a runner runs on the same branch, ref or job, so a setting that
keeps only "the newest build" cancels merge-queue builds that are all meant to finish:
Buildkite's *Cancel Intermediate Builds* and *Skip Intermediate Builds*; a GitHub
``concurrency`` group that is not unique per run (a shared group keeps one run going and
cancels the older pending one; ``cancel-in-progress`` cancels the running one too); GitLab's
*Auto-cancel redundant pipelines*; Jenkins' ``disableConcurrentBuilds(abortPrevious: true)``.
docs/ci-runners.md ("Sibling builds") says how to configure around them.

The functions here only read what the vendor's API shows, and word doctor's rows; each
runner module fetches what they read, in its ``doctor`` hook (``RunnerKind.doctor``).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from buildq.buildrunner.registry import DoctorRow

#: What in a GitHub concurrency group makes it unique per buildq build.
_UNIQUE_PER_RUN = ("buildq_request_id", "github.run_id")
#: The job property behind ``disableConcurrentBuilds`` (workflow-job plugin).
JENKINS_DISABLE_CONCURRENT = (
    "org.jenkinsci.plugins.workflow.job.properties.DisableConcurrentBuildsJobProperty"
)

_DOCS = "docs/ci-runners.md#sibling-builds"
BUILDKITE_FIX = (
    "in the pipeline's Settings > Builds, turn it off or add '!{branch}' to its branch filter "
    f"(see {_DOCS})"
)
GITHUB_FIX = (
    "make the group unique per build, e.g. group: buildq-${{{{ inputs.buildq_request_id }}}}, "
    f"or remove it from {{path}} (see {_DOCS})"
)
GITLAB_FIX = (
    "turn off Auto-cancel redundant pipelines in Settings > CI/CD > General pipelines, or set "
    f"workflow:auto_cancel:on_new_commit: none for buildq's pipelines (see {_DOCS})"
)
JENKINS_FIX = (
    "drop abortPrevious from disableConcurrentBuilds in the job's Jenkinsfile options or its "
    f"configuration; without it builds wait their turn (see {_DOCS})"
)


def rows(
    name: str, where: str, warnings: list[str] | None, fix: str, unseen: str = ""
) -> list[DoctorRow]:
    """Doctor's rows for runner ``name``: the token can see ``where``; then a WARN per
    warning, or, when the settings could not be read (``warnings`` None), a skip saying why
    (``unseen``)."""
    found = [DoctorRow(f"runner {name} api", "ok", f"the token can see {where}")]
    label = f"runner {name} siblings"
    if warnings is None:
        return [*found, DoctorRow(label, "skip", unseen)]
    return found + [DoctorRow(label, "WARN", warning, fix) for warning in warnings]


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


def gitlab_warnings(project: Mapping[str, Any], ref: str) -> list[str] | None:
    """What of a project's CI/CD settings cancels buildq's pipelines on ``ref``; None when the
    token cannot see them (GitLab shows them to a Maintainer only)."""
    setting = project.get("auto_cancel_pending_pipelines")
    if not isinstance(setting, str):
        return None
    if setting != "enabled":
        return []
    # GitLab skips pipelines of the new one's commit and of the ref's head: only a ref that
    # moved (a push, a merge) makes buildq's older pipelines redundant in its eyes.
    return [
        f"Auto-cancel redundant pipelines is on: when ref {ref!r} moves (a push, a merge), GitLab "
        "cancels buildq's pipelines on an older commit that are pending or have started only "
        "interruptible jobs, so buildq's builds cancel each other (reported CANCELLED)"
    ]


def jenkins_warnings(job: Mapping[str, Any]) -> list[str] | None:
    """Whether a job's ``disableConcurrentBuilds`` aborts running builds; None when its JSON
    does not say."""
    properties = job.get("property")
    if not isinstance(properties, list):
        return None
    if not any(
        isinstance(p, Mapping) and p.get("_class") == JENKINS_DISABLE_CONCURRENT for p in properties
    ):
        return []
    concurrent = job.get("concurrentBuild")
    if not isinstance(concurrent, bool):
        return None
    # ``abortPrevious`` itself is not exported, but with the property set a Pipeline job
    # reports concurrentBuild true only when abortPrevious is (WorkflowJob.isConcurrentBuild).
    if not concurrent:
        return []
    return [
        "disableConcurrentBuilds(abortPrevious: true) is set: each new build of the job aborts "
        "the running one, so buildq's builds abort each other (Jenkins records NOT_BUILT, "
        "which buildq reports FAILED, reason infra)"
    ]
