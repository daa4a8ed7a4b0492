"""The project's import graph: no cycles anywhere, and every import in the documented direction.

Read from the source with ``ast`` (every import counts, a lazy one inside a function too: a cycle
hidden in a function is still a cycle a newcomer has to untangle). ARCHITECTURE.md's package table and
compressor's room table are what these rules check.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("edgeprune", "compressor", "edge_runtime", "deploy", "benchmarks")

# What each package may never import (besides the project packages further down the flow).
FORBIDDEN = {
    "edge_runtime": ("compressor", "deploy", "benchmarks", "edgeprune", "torch", "paramiko", "onnx"),
    "compressor": ("deploy", "benchmarks", "edgeprune", "paramiko"),
    "deploy": ("compressor", "benchmarks", "edgeprune", "torch"),
}

# compressor's rooms, lowest first: a module may import its own room and the rooms before it.
ROOMS = [
    {"compressor.errors", "compressor.config", "compressor.checkpoints"},
    {"compressor.prune"},
    {"compressor.train"},
    {"compressor.run"},
    {"compressor.export"},
    {"compressor.pipeline", "compressor.compress_cli", "compressor.export_cli", "compressor.latency_shapes",
     "compressor"},
]


def project_modules() -> Dict[str, Path]:
    """Dotted name -> file of every module of the five packages (studies included)."""
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imported_names(path: Path, module: str) -> Set[str]:
    """Every dotted name ``path`` imports (``from a import b`` gives ``a`` and ``a.b``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def resolve(name: str, modules: Dict[str, Path]) -> str:
    """The project module ``name`` is, or lies in ('' when it is not the project's)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> Dict[str, Set[str]]:
    modules = project_modules()
    graph = {}
    for module, path in modules.items():
        targets = {resolve(name, modules) for name in imported_names(path, module)}
        # a package's __init__ is imported on the way to any of its modules: that edge is not a dependency
        graph[module] = {t for t in targets if t and t != module and not module.startswith(t + ".")}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def room_of(module: str) -> int:
    for rank, room in enumerate(ROOMS):
        if any(module == member or module.startswith(member + ".") for member in room if member != "compressor"):
            return rank
    return len(ROOMS) - 1 if module == "compressor" else -1


def test_no_import_cycles_anywhere() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_package_imports_against_the_flow() -> None:
    offences = []
    modules = project_modules()
    for module, path in modules.items():
        banned = FORBIDDEN.get(module.split(".")[0], ())
        for name in imported_names(path, module):
            if name.split(".")[0] in banned:
                offences.append(f"{module} imports {name}")
    assert offences == []


def test_compressor_rooms_import_only_downwards() -> None:
    offences = []
    for module, targets in import_graph().items():
        if not module.startswith("compressor"):
            continue
        for target in targets:
            if target.startswith("compressor") and room_of(target) > room_of(module):
                offences.append(f"{module} (room {room_of(module)}) imports {target} (room {room_of(target)})")
    assert offences == []


def test_every_compressor_module_has_a_room() -> None:
    assert [m for m in project_modules() if m.startswith("compressor") and room_of(m) < 0] == []
