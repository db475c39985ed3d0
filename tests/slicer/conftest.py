"""Fixtures of the Slicer module tests: ``slicer/MedSeg`` on ``sys.path`` (as Slicer puts a module's folder there),
and the tiny trained models of the server tests.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tests.server.conftest import models_dir, tiny_models  # noqa: F401 (fixtures used by name)

MODULE_DIR = Path(__file__).resolve().parents[2] / "slicer" / "MedSeg"
if str(MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(MODULE_DIR))
