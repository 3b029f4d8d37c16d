"""``buildq doctor``'s questions to the CI services (skipped with ``--offline``).

For each Buildkite or GitHub runner: can the token see the pipeline or workflow, and does the
CI side have a setting that cancels buildq's builds against each other (docs/ci-runners.md,
"Sibling builds")? Each answer is a row of doctor's table: (name, status, detail, fix).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from buildq.buildrunner import RunnerError, RunnerUnauthorized, TransientRunnerError, _siblings
from buildq.buildrunner import buildkite as bk
from buildq.buildrunner import github as gh
from buildq.storage.errors import first_line

Row = tuple[str, str, str, str]

_DOCS = "docs/ci-runners.md#sibling-builds"
_BUILDKITE_FIX = (
    "in the pipeline's Settings > Builds, turn it off or add '!{branch}' to its branch filter "
    f"(see {_DOCS})"
)
_GITHUB_FIX = (
    "make the group unique per build, e.g. group: buildq-${{{{ inputs.buildq_request_id }}}}, "
    f"or remove it from {{path}} (see {_DOCS})"
)


def inspect(name: str, kind: str, config: Any) -> list[Row]:
    """Rows for runner ``name`` of type ``kind`` (whose config already validated)."""
    if kind == "buildkite":
        return _ask(name, config.http.api_url, lambda: _buildkite(name, config))
    if kind == "github":
        return _ask(name, config.http.api_url, lambda: _github(name, config))
    return []


def _ask(name: str, api_url: str, rows: Callable[[], list[Row]]) -> list[Row]:
    label = f"runner {name} api"
    try:
        return rows()
    except RunnerUnauthorized as err:
        return [
            (
                label,
                "FAIL",
                err.summary,
                "give the runner a token with the permissions in docs/ci-runners.md",
            )
        ]
    except TransientRunnerError as err:
        fix = "check api_url and this host's network (or run doctor with --offline)"
        return [(label, "FAIL", f"cannot reach {api_url}: {first_line(err)}", fix)]
    except RunnerError as err:  # a 404 for the pipeline or workflow: a config error
        return [(label, "FAIL", first_line(err), "check the runner's table against the CI service")]


def _buildkite(name: str, config: bk.BuildkiteConfig) -> list[Row]:
    runner = bk.BuildkiteRunner(config, bk.make_client(config), name=name)
    try:
        pipeline = runner.pipeline()
    finally:
        runner.close()
    where = f"pipeline {config.organization}/{config.pipeline}"
    rows: list[Row] = [(f"runner {name} api", "ok", f"the token can see {where}", "")]
    fix = _BUILDKITE_FIX.format(branch=config.branch)
    for warning in _siblings.buildkite_warnings(pipeline, config.branch):
        rows.append((f"runner {name} siblings", "WARN", warning, fix))
    return rows


def _github(name: str, config: gh.GitHubConfig) -> list[Row]:
    runner = gh.GitHubRunner(config, gh.make_client(config), name=name)
    try:
        workflow = runner.workflow_file()
    finally:
        runner.close()
    where = f"workflow {config.workflow} of {config.owner}/{config.repo}"
    rows: list[Row] = [(f"runner {name} api", "ok", f"the token can see {where}", "")]
    label = f"runner {name} siblings"
    if workflow is None:
        detail = f"cannot read {config.workflow} at {config.ref} (the token lacks Contents: read)"
        return [*rows, (label, "skip", detail + ": its concurrency settings were not checked", "")]
    fix = _GITHUB_FIX.format(path=config.workflow)
    for warning in _siblings.github_warnings(workflow):
        rows.append((label, "WARN", warning, fix))
    return rows
