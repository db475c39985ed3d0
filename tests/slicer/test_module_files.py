"""Static checks of the Slicer extension files (the Slicer application itself is not available to the tests).

* every ``self.ui.<name>`` (and every widget named by a string) in ``MedSeg.py`` is a widget of ``MedSeg.ui``;
* every file named in the CMake lists exists, and every Python file of the module is installed by them;
* every Python file under ``slicer/`` parses with the grammar of Python 3.9 (older Slicer releases) and compiles;
* ``MedSeg.py`` has Slicer's four classes on the right bases; ``MedSegLib`` imports without slicer, vtk, qt or torch
  (and its client without numpy); credentials never reach a log call.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
EXTENSION = ROOT / "slicer"
MODULE = EXTENSION / "MedSeg"
SCRIPT = MODULE / "MedSeg.py"
UI = MODULE / "Resources" / "UI" / "MedSeg.ui"
PY_FILES = sorted(EXTENSION.rglob("*.py"))


def ui_widgets() -> dict[str, str]:
    root = ET.parse(UI).getroot()
    names = [(w.get("name"), w.get("class")) for w in root.iter("widget")]
    assert len({n for n, _ in names}) == len(names), "widget names in MedSeg.ui must be unique"
    return {str(n): str(c) for n, c in names}


def test_every_ui_name_used_exists_in_the_ui_file() -> None:
    widgets = ui_widgets()
    source = SCRIPT.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    used |= set(re.findall(r'"(\w+(?:Selector|Button|LineEdit|CheckBox|SpinBox|Label|Table|Bar|ComboBox))"', source))
    assert len(used) > 20
    assert sorted(used - set(widgets)) == []
    assert widgets["MedSeg"] == "qMRMLWidget"
    assert widgets["inputVolumeSelector"] == "qMRMLNodeComboBox"
    assert 'resourcePath("UI/MedSeg.ui")' in source


def test_ui_custom_widgets_are_declared() -> None:
    root = ET.parse(UI).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    custom = {c for c in ui_widgets().values() if not c.startswith("Q")}
    assert custom <= declared, custom - declared


def _cmake_files(cmake: Path) -> list[str]:
    text = re.sub(r"#.*", "", cmake.read_text())
    name = re.search(r"set\(MODULE_NAME\s+(\w+)\)", text)
    listed: list[str] = []
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)\s+([^)]*)\)", text):
        listed += [f.replace("${MODULE_NAME}", name.group(1) if name else "") for f in block.split()]
    return listed


def test_every_file_named_in_the_cmake_lists_exists() -> None:
    top = re.sub(r"#.*", "", (EXTENSION / "CMakeLists.txt").read_text())
    for call in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})", "Slicer_EXTENSION_CPACK"):
        assert call in top
    subdirs = re.findall(r"add_subdirectory\((\w+)\)", top)
    assert subdirs == ["MedSeg"]
    for sub in subdirs:
        cmake = EXTENSION / sub / "CMakeLists.txt"
        text = cmake.read_text()
        assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
        assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
        listed = _cmake_files(cmake)
        missing = [f for f in listed if not (EXTENSION / sub / f).is_file()]
        assert missing == [] and listed
        installed = {(EXTENSION / sub / f).resolve() for f in listed}
        unlisted = [p for p in (EXTENSION / sub).rglob("*.py") if p.resolve() not in installed]
        assert unlisted == [], "Python files the module would not install"
    with Image.open(MODULE / "Resources" / "Icons" / "MedSeg.png") as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: str(p.relative_to(EXTENSION)))
def test_python_files_parse_for_python_3_9_and_compile(path: Path) -> None:
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=(3, 9))
    compile(source, str(path), "exec")
    assert "from __future__ import annotations" in source, "needed for `X | None` hints on Python 3.9"
    for node in ast.walk(tree):
        # zip(strict=...) and match statements are Python 3.10+; Slicer 5.6 and older ship 3.9.
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip":
            assert not node.keywords, f"{path.name}:{node.lineno}: zip(strict=) needs Python 3.10"
        for banned in ("cgi", "requests", "torch", "monai", "medseg"):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] != banned for a in node.names), f"{path.name} imports {banned}"
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != banned, f"{path.name} imports {banned}"


def test_module_script_has_slicers_four_classes() -> None:
    tree = ast.parse(SCRIPT.read_text())
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    bases = {name: [getattr(b, "id", None) for b in node.bases] for name, node in classes.items()}
    assert bases["MedSeg"] == ["ScriptedLoadableModule"]
    assert bases["MedSegWidget"] == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert bases["MedSegLogic"] == ["ScriptedLoadableModuleLogic"]
    assert bases["MedSegTest"] == ["ScriptedLoadableModuleTest"]
    methods = {n.name for n in classes["MedSegTest"].body if isinstance(n, ast.FunctionDef)}
    assert {"runTest", "setUp", "test_segment_on_server"} <= methods


_BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} must not be imported")
BLOCKED = set(sys.argv[1].split(","))
sys.meta_path.insert(0, Block())
sys.path.insert(0, sys.argv[2])
for module in sys.argv[3].split(","):
    __import__(module)
"""


@pytest.mark.parametrize(
    ("modules", "blocked"),
    [
        ("MedSegLib.client", "slicer,vtk,qt,ctk,torch,numpy,requests,cgi"),
        ("MedSegLib.scene", "slicer,vtk,qt,ctk,torch"),
    ],
)
def test_medseglib_imports_without_slicer(modules: str, blocked: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _BLOCKER, blocked, str(MODULE), modules], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr


_SECRETS = re.compile(r"api_?key|password|_token|apiKey", re.IGNORECASE)


@pytest.mark.parametrize("path", PY_FILES, ids=lambda p: str(p.relative_to(EXTENSION)))
def test_credentials_never_reach_a_log_call(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = getattr(node.func.value, "id", "")
            if owner in ("logger", "logging") or node.func.attr in ("debug", "info", "warning", "error", "exception"):
                args = " ".join(ast.unparse(a) for a in node.args)
                assert not _SECRETS.search(args), f"{path.name}:{node.lineno} logs {args}"
