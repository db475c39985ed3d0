"""`medseg models` says which inputs each model segments; `medseg demo --task` names its tasks."""

from __future__ import annotations

import json

from medseg.models import get_card
from pipelines.cli import accepted_inputs
from tests.helpers import run_cli


def test_models_json_lists_accepted_inputs(capsys, monkeypatch) -> None:
    code, out = run_cli(["models", "--json"], capsys, monkeypatch)
    assert code == 0
    accepts = {c["name"]: c["accepts"] for c in json.loads(out)}
    assert accepts["unet2d"] == "2D, 2D+t, 3D (per slice)" and accepts["unet"] == "3D"
    assert accepted_inputs(get_card("segformer3d")) == "3D"


def test_demo_refuses_an_unknown_task(capsys, monkeypatch, tmp_path) -> None:
    code, out = run_cli(["demo", "--task", "cardiology", "--out", str(tmp_path / "d")], capsys, monkeypatch)
    assert code != 0 and not (tmp_path / "d").exists() and "not a demo task" in out
