"""The packages keep their layering (``scripts/imports.py``, ``make imports``): the SQL base
imports neither store, the queue never imports the orchestrator, the queue's SQL backend and
the build store's SQL do not import each other, config stands below the orchestrator, and no
import cycle runs inside ``buildq/``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def imports() -> ModuleType:
    spec = importlib.util.spec_from_file_location("imports_script", ROOT / "scripts" / "imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_every_layering_rule_holds(imports: ModuleType) -> None:
    broken = imports.violations(imports.load(ROOT))
    assert [f"{rule.text}: {e.source} imports {e.target}" for rule, e in broken] == []


def test_no_import_cycle_inside_buildq(imports: ModuleType) -> None:
    found = imports.cycles(imports.load(ROOT), "buildq.")
    assert [" -> ".join(e.source for e in cycle) for cycle in found] == []


def test_the_checker_sees_a_lazy_import_against_the_rules(imports: ModuleType) -> None:
    edge = imports.Edge("buildq.storage.database", "buildq.queue.sql.dialect", "lazy", 1)
    back = imports.Edge("buildq.queue.sql.dialect", "buildq.storage.database", "top", 1)
    graph = imports.Graph(
        {"buildq.storage.database": Path("a.py"), "buildq.queue.sql.dialect": Path("b.py")},
        {},
        [edge, back],
    )
    assert [rule.text for rule, _ in imports.violations(graph)] == [
        "the SQL base imports neither the queue, the orchestrator, the config nor the CLI"
    ]
    assert imports.cycles(graph) == [[back, edge]]


def test_the_report_exits_0_when_the_rules_hold(
    imports: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    assert imports.main(["--root", str(ROOT)]) == 0
    out = capsys.readouterr().out
    assert "# Layering rules" in out and "FAIL" not in out
