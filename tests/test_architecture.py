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
