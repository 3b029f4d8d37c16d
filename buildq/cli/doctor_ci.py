"""``buildq doctor``'s questions to the CI services (skipped with ``--offline``).

A runner kind asks its own questions through its doctor hook (``RunnerKind.doctor``; built-in
kinds and plugins alike): can the token see the pipeline, project, workflow or job, and does
the CI side have a setting that cancels buildq's builds against each other
(docs/ci-runners.md, "Sibling builds")? Here the hook runs, and a hook that could not ask
becomes a FAIL row with the fix. Each answer is a row of doctor's table: (name, status,
detail, fix).
"""

from __future__ import annotations

from typing import Any

from buildq.buildrunner import RunnerError, RunnerUnauthorized, TransientRunnerError
from buildq.buildrunner.registry import DoctorRow, RunnerKind
from buildq.storage.errors import first_line


def inspect(name: str, kind: RunnerKind, config: Any) -> list[DoctorRow]:
    """Rows for runner ``name`` of ``kind`` (whose config already validated)."""
    if kind.doctor is None:
        return []
    label = f"runner {name} api"
    try:
        return list(kind.doctor(name, config))
    except RunnerUnauthorized as err:
        fix = "give the runner a token with the permissions in docs/ci-runners.md"
        return [DoctorRow(label, "FAIL", err.summary, fix)]
    except TransientRunnerError as err:
        fix = "check api_url and this host's network (or run doctor with --offline)"
        where = _api_url(config) or "the CI service"
        return [DoctorRow(label, "FAIL", f"cannot reach {where}: {first_line(err)}", fix)]
    except RunnerError as err:  # a 404 for the pipeline or workflow: a config error
        fix = "check the runner's table against the CI service"
        return [DoctorRow(label, "FAIL", first_line(err), fix)]
    except Exception as err:  # a plugin's hook can fail in any way; one line names it
        detail = f"the doctor check of type {kind.name} failed: {type(err).__name__}: "
        return [DoctorRow(label, "FAIL", detail + first_line(err), f"report it to {kind.source}")]


def _api_url(config: Any) -> str | None:
    """The HTTP runners' ``api_url`` (a plugin's config may have none)."""
    url = getattr(getattr(config, "http", None), "api_url", None)
    return url if isinstance(url, str) else None
