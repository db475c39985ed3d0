"""Static rules of the code base: the library never reaches up into pipelines/server, never prints, stays small."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted((ROOT / "medseg").rglob("*.py"))
FORBIDDEN = ("fastapi", "server", "pipelines", "uvicorn")


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_library_module_rules(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            names = []
        for name in names:
            assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id not in ("print", "eval", "exec"), f"{path.name}:{node.lineno} calls {node.func.id}()"
    assert len(path.read_text().splitlines()) <= 800, f"{path.name} is over 800 lines"


def test_import_medseg_is_light() -> None:
    import subprocess
    import sys

    code = "import sys, medseg; print(sorted(m for m in ('torch', 'monai') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"`import medseg` pulled in {out}"


# ------------------------------------------------------------------------------------------ import graph of medseg/
#: The floors of the library (docs/architecture.md): a module imports only modules on its floor or below.
FLOORS = {"core": 0, "io": 1, "models": 1, "data": 2, "transforms": 2, "inference": 3, "training": 4, "integrations": 5}
FACADE_FLOOR = 6  # medseg/__init__.py and medseg/api.py


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the package at ``root`` it imports (at any depth: lazy imports count too)."""
    files = {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    module = ".".join([*base, node.module] if node.module else base)
                else:
                    module = node.module or ""
                for alias in node.names:
                    sub = f"{module}.{alias.name}"
                    targets.add(sub if sub in files else module)
        graph[name] = {t for t in targets if t in files and t != name and t.split(".")[0] == top}
    return graph


def floor_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] == "api":
        return FACADE_FLOOR
    if parts[1] not in FLOORS:
        raise AssertionError(
            f"{module}: package {parts[1]!r} has no floor in FLOORS (add it, see docs/architecture.md)"
        )
    return FLOORS[parts[1]]


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts if floor_of(t) > floor_of(m))


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_medseg_has_no_import_cycle_and_no_upward_import() -> None:
    graph = import_graph(ROOT / "medseg")
    assert len(graph) > 50
    assert upward_imports(graph) == []
    assert import_cycles(graph) == []


def test_the_graph_checks_catch_cycles_and_upward_imports(tmp_path: Path) -> None:
    pkg = tmp_path / "medseg"
    for sub in ("core", "inference", "integrations"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from medseg.core import b\n")
    (pkg / "core" / "b.py").write_text("def f():\n    from . import a\n")
    (pkg / "inference" / "p.py").write_text("import medseg.integrations.q\n")
    (pkg / "integrations" / "q.py").write_text("from medseg.inference.p import x\n")
    graph = import_graph(pkg)
    assert upward_imports(graph) == ["medseg.inference.p -> medseg.integrations.q"]
    assert import_cycles(graph) == [
        ["medseg.core.a", "medseg.core.b"],
        ["medseg.inference.p", "medseg.integrations.q"],
    ]
