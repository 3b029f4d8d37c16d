"""The import graph of ``buildq/`` and ``bench/``, its cycles, its largest modules, and the
layering rules (docs/architecture.md). Standard library only: ``python3 scripts/imports.py``.

Exits 1 if a layering rule is broken. ``--root DIR`` reads another checkout.

An import is an edge from the importing module to the module it names: ``from a.b import c``
is ``a.b.c`` when that is a module, else ``a.b``. Edges are marked ``lazy`` (inside a
function) or ``typing`` (under ``if TYPE_CHECKING``); cycles and rules count them all, since
each is still a dependency. The package ``__init__`` modules Python runs on the way to a
module are not edges of their own.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("buildq", "bench")
BUDGET_LINES = 400
#: The shared SQL base (engine, dialect, column types, storage errors). ``buildq.db`` was its
#: name before issue 16: listed so the script reads older checkouts too.
BASE = ("buildq.storage", "buildq.db")
#: The build store's SQL: its table and the modules that read and write it.
BUILD_STORE_SQL = ("buildq.orchestrator.schema", "buildq.orchestrator.sql")
QUEUE_SQL = "buildq.queue.sql"


@dataclass(frozen=True, slots=True)
class Edge:
    source: str
    target: str
    kind: str  # "top", "lazy" or "typing"
    line: int


@dataclass(slots=True)
class Graph:
    modules: dict[str, Path]  # module name -> file
    lines: dict[str, int]
    edges: list[Edge]

    def targets(self, source: str) -> set[str]:
        return {e.target for e in self.edges if e.source == source}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def load(root: Path, packages: Iterable[str] = PACKAGES) -> Graph:
    """Every module under ``packages`` and the imports between them."""
    modules = {
        module_name(root, path): path
        for package in packages
        for path in sorted((root / package).rglob("*.py"))
    }
    lines = {name: len(path.read_text().splitlines()) for name, path in modules.items()}
    edges: dict[tuple[str, str, str], Edge] = {}
    for name, path in modules.items():
        for edge in _imports(name, path, modules):
            if edge.target != name:
                edges.setdefault((edge.source, edge.target, edge.kind), edge)
    return Graph(modules, lines, list(edges.values()))


def _imports(name: str, path: Path, modules: dict[str, Path]) -> Iterator[Edge]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    for node, kind in _walk(tree.body, "top"):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known(alias.name, modules)
                if target:
                    yield Edge(name, target, kind, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_package, node.module, node.level)
            for alias in node.names:
                target = _known(f"{base}.{alias.name}", modules) or _known(base, modules)
                if target:
                    yield Edge(name, target, kind, node.lineno)


def _walk(body: list[ast.stmt], kind: str) -> Iterator[tuple[ast.stmt, str]]:
    """Every statement, with the kind of import it would be where it stands."""
    for node in body:
        yield node, kind
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield from _walk(node.body, "lazy")
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _walk(node.body, "typing" if kind == "top" else kind)
            yield from _walk(node.orelse, kind)
        else:  # class bodies, if/try/with/for/match blocks: run where they stand
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.stmt):
                    yield from _walk([child], kind)
                elif isinstance(child, ast.ExceptHandler | ast.match_case):
                    yield from _walk(child.body, kind)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _absolute(name: str, is_package: bool, module: str | None, level: int) -> str:
    if level == 0:
        return module or ""
    parts = name.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (level - 1)]
    return ".".join([*anchor, *([module] if module else [])])


def _known(dotted: str, modules: dict[str, Path]) -> str | None:
    return dotted if dotted in modules else None


# --- the package graph -----------------------------------------------------------------------


def unit(module: str) -> str:
    """The package a module is counted in; a module directly under ``buildq`` or ``bench``
    (``buildq.webhook``) is its own unit."""
    parts = module.split(".")
    return module if len(parts) <= 2 else ".".join(parts[:-1])


def package_graph(graph: Graph) -> dict[str, dict[str, list[Edge]]]:
    """unit -> unit it imports -> the edges between them."""
    out: dict[str, dict[str, list[Edge]]] = defaultdict(lambda: defaultdict(list))
    for name in graph.modules:
        out[unit(name)]  # a unit that imports nothing still shows
    for edge in graph.edges:
        source, target = unit(edge.source), unit(edge.target)
        if source != target:
            out[source][target].append(edge)
    return out


# --- cycles ------------------------------------------------------------------------------------


def cycles(graph: Graph, prefix: str = "", *, typing: bool = False) -> list[list[Edge]]:
    """One shortest cycle through each strongly connected group of modules under ``prefix``,
    as its edges. Imports that run (at the top or in a function) only, unless ``typing``:
    then ``TYPE_CHECKING`` imports too."""
    edges: dict[str, dict[str, Edge]] = defaultdict(dict)
    for edge in sorted(graph.edges, key=lambda e: e.kind != "top"):
        if edge.kind == "typing" and not typing:
            continue
        if edge.source.startswith(prefix) and edge.target.startswith(prefix):
            edges[edge.source].setdefault(edge.target, edge)
    found = []
    for component in _components(sorted(graph.modules), edges):
        if len(component) > 1:
            found.append(_shortest_cycle(min(component), component, edges))
    return found


def _components(nodes: list[str], edges: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Strongly connected components (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    result: list[set[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                result.append(component)
    return result


def _shortest_cycle(start: str, within: set[str], edges: dict[str, dict[str, Edge]]) -> list[Edge]:
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target, edge in sorted(edges[node].items()):
                if target not in within:
                    continue
                if target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if target not in came_from:
                    came_from[target] = edge
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a component but on no cycle")


# --- layering rules ----------------------------------------------------------------------------


def _in(module: str, prefixes: str | Iterable[str]) -> bool:
    """Is ``module`` one of ``prefixes`` or inside one of those packages?"""
    if isinstance(prefixes, str):
        prefixes = (prefixes,)
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _is_build_store_sql(module: str) -> bool:
    """``orchestrator.schema`` and every ``orchestrator.sql*`` module."""
    return any(module.startswith(p) for p in BUILD_STORE_SQL)


@dataclass(frozen=True, slots=True)
class Rule:
    text: str
    covers: Callable[[str], bool]  # the importing modules it is about
    forbids: Callable[[str], bool]  # what they may not import


RULES = [
    Rule(
        "the SQL base imports neither the queue, the orchestrator, the config nor the CLI",
        lambda source: _in(source, BASE),
        lambda target: _in(
            target, ("buildq.queue", "buildq.orchestrator", "buildq.config", "buildq.cli")
        ),
    ),
    Rule(
        "the queue never imports the orchestrator",
        lambda source: _in(source, "buildq.queue"),
        lambda target: _in(target, "buildq.orchestrator"),
    ),
    Rule(
        "the queue's SQL backend does not import the build store's SQL",
        lambda source: _in(source, QUEUE_SQL),
        _is_build_store_sql,
    ),
    Rule(
        "the build store's SQL does not import the queue's SQL backend",
        _is_build_store_sql,
        lambda target: _in(target, QUEUE_SQL),
    ),
    Rule(
        "config does not import the orchestrator",
        lambda source: _in(source, "buildq.config"),
        lambda target: _in(target, "buildq.orchestrator"),
    ),
]


def violations(graph: Graph) -> list[tuple[Rule, Edge]]:
    """Every (rule, edge) that breaks a layering rule."""
    return [
        (rule, edge)
        for rule in RULES
        for edge in graph.edges
        if rule.covers(edge.source) and rule.forbids(edge.target)
    ]


# --- report ------------------------------------------------------------------------------------


def _print_cycles(found: list[list[Edge]]) -> None:
    for cycle in found:
        steps = " -> ".join(f"{e.source}{_mark(e)}" for e in cycle)
        print(f"{steps} -> {cycle[0].source}")
    if not found:
        print("(none)")


def _mark(edge: Edge) -> str:
    return "" if edge.kind == "top" else f" ({edge.kind})"


def report(graph: Graph, *, largest: int = 15) -> int:
    print("# Package import graph (unit -> units it imports; how many module pairs)")
    for source, targets in sorted(package_graph(graph).items()):
        shown = []
        for target, edges in sorted(targets.items()):
            kinds = {e.kind for e in edges}
            only = f", {kinds.pop()} only" if kinds != {"top"} and len(kinds) == 1 else ""
            shown.append(f"{target} ({len(edges)}{only})")
        print(f"{source} -> {', '.join(shown) if shown else '(nothing)'}")

    print("\n# Import cycles between modules (an edge marked lazy imports inside a function)")
    found = cycles(graph)
    _print_cycles(found)
    print("\n# Cycles only through TYPE_CHECKING imports (never run; a mutual dependency)")
    runtime = {frozenset(e.source for e in cycle) for cycle in found}
    _print_cycles(
        [c for c in cycles(graph, typing=True) if frozenset(e.source for e in c) not in runtime]
    )

    print(f"\n# Largest modules (lines; budget {BUDGET_LINES})")
    ranked = sorted(graph.lines.items(), key=lambda item: (-item[1], item[0]))[:largest]
    for name, count in ranked:
        over = "  over budget" if count > BUDGET_LINES else ""
        print(f"{count:6d}  {graph.modules[name].as_posix()}{over}")

    print("\n# Layering rules")
    broken = violations(graph)
    for rule in RULES:
        hits = [edge for r, edge in broken if r is rule]
        print(f"{'FAIL' if hits else 'ok  '}  {rule.text}")
        for edge in hits:
            where = graph.modules[edge.source].as_posix()
            print(f"        {where}:{edge.line}: imports {edge.target}{_mark(edge)}")
    return 1 if broken else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parent.parent,
        help="the checkout to read (default: this one)",
    )
    args = parser.parse_args(argv)
    graph = load(args.root.resolve())
    for name in graph.modules:
        graph.modules[name] = graph.modules[name].relative_to(args.root.resolve())
    return report(graph)


if __name__ == "__main__":
    sys.exit(main())
