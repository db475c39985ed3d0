"""One predictor contract: every kind of model folder opens as a ``SegmentationPredictor`` through one opener."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.data import MetaTensor

import medseg
from medseg import is_model_folder, open_predictor
from medseg.core.config import ExperimentConfig
from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.inference import Predictor, PromptPredictor, Prompts, SegmentationPredictor
from medseg.inference.openers import OPENERS, register_opener
from medseg.inference.rundir import RunDir, save_checkpoint
from medseg.models import create_model, tiny_overrides


def _run_dir(root: Path, name: str) -> Path:
    torch.manual_seed(0)
    kwargs = tiny_overrides(name)
    model = create_model(name, **kwargs)
    run = RunDir(root)
    run.checkpoints.mkdir(parents=True)
    run.config.write_text(ExperimentConfig().updated({"model": {"name": name, "kwargs": kwargs}}).to_yaml())
    card = model.card
    state = {"model": model.state_dict(), "card": card.to_dict(), "model_name": card.name, "model_kwargs": kwargs}
    save_checkpoint(state, run.best)
    save_checkpoint(state, run.last)
    return root


def _nnunet_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "plans.json").write_text(json.dumps({"dataset_name": "Dataset001_X", "configurations": {}}))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "channel_names": {"0": "CT"}}))
    return root


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_dir(tmp_path_factory.mktemp("dense") / "run", "unet")


@pytest.fixture(scope="module")
def prompted_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run_dir(tmp_path_factory.mktemp("prompted") / "run", "sam_unet_r34")


def test_every_predictor_kind_fulfils_the_contract() -> None:
    from medseg.integrations.nnunet.results import NnUNetResultsPredictor

    expected = ["self", "image", "prompts", "tta", "keep_probabilities", "progress"]
    for kind in (Predictor, PromptPredictor, NnUNetResultsPredictor):
        assert issubclass(kind, SegmentationPredictor)
        params = inspect.signature(kind.predict).parameters
        assert list(params)[: len(expected)] == expected, kind  # the contract's parameters, in its order
        assert all(params[n].kind is inspect.Parameter.KEYWORD_ONLY for n in expected[2:]), kind
        extras = list(params)[len(expected) :]  # a kind's own options (the dense one: probabilities_out) ...
        assert all(  # ... are keyword-only with defaults, so any caller of the contract can ignore them
            params[n].kind is inspect.Parameter.KEYWORD_ONLY and params[n].default is not inspect.Parameter.empty
            for n in extras
        ), kind
    with pytest.raises(TypeError):
        SegmentationPredictor()  # type: ignore[abstract]


def test_open_predictor_opens_a_dense_run_dir(dense_run: Path) -> None:
    predictor = open_predictor(dense_run, device="cpu", checkpoint="last")
    assert isinstance(predictor, Predictor) and not predictor.needs_prompts
    assert predictor.label_names == predictor.card.label_names
    assert medseg.open_predictor is open_predictor and is_model_folder(dense_run)
    assert predictor.config.infer.tta_axes == (0,)  # the run's default
    for value, axes in (("y,z", (1, 2)), ("all", None)):
        other = open_predictor(dense_run, device="cpu", tta_axes=value)
        assert isinstance(other, Predictor) and other.config.infer.tta_axes == axes


def test_a_dense_model_refuses_prompts_and_wrong_images(dense_run: Path) -> None:
    predictor = open_predictor(dense_run, device="cpu")
    image = MetaTensor(torch.rand(1, 16, 16, 16))
    predictor.check_input(image)
    with pytest.raises(ModelInputError, match="model 'unet' does not take prompts"):
        predictor.check_input(image, Prompts.from_cli(["1,1,5,5,0,3"], []))
    with pytest.raises(ModelInputError, match="does not take prompts"):  # predict checks before any work
        predictor.predict(image, prompts=Prompts.from_cli(["1,1,5,5,0,3"], []))
    with pytest.raises(ModelInputError, match="2 channel"):
        predictor.check_input(MetaTensor(torch.rand(2, 16, 16, 16)))
    with pytest.raises(ModelInputError, match="has shape"):
        predictor.check_input(MetaTensor(torch.rand(16, 16, 16)))


def test_a_prompted_model_requires_prompts(prompted_run: Path) -> None:
    predictor = open_predictor(prompted_run, device="cpu")
    assert isinstance(predictor, PromptPredictor) and predictor.needs_prompts
    image = MetaTensor(torch.rand(1, 24, 24, 2))
    for prompts in (None, Prompts()):
        with pytest.raises(ModelInputError, match="'sam_unet_r34' is prompted and needs a box.*--box x0,y0,x1,y1"):
            predictor.check_input(image, prompts)
    predictor.check_input(image, Prompts.from_cli(["1,1,5,5,0,1"], []))
    with pytest.raises(ModelInputError, match="outside the image"):
        predictor.check_input(image, Prompts.from_cli(["1,1,5,5,0,9"], []))
    with pytest.raises(ModelInputError, match="grey or RGB"):
        predictor.check_input(MetaTensor(torch.rand(2, 24, 24, 2)), Prompts.from_cli(["1,1,5,5,0,1"], []))


def test_open_predictor_errors(tmp_path: Path, dense_run: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist") as err:
        open_predictor(tmp_path / "missing")
    assert "medseg run directory" in str(err.value) and "nnU-Net v2 results folder" in str(err.value)
    (tmp_path / "data").mkdir()
    with pytest.raises(ConfigError, match="not a model folder"):
        open_predictor(tmp_path / "data")
    with pytest.raises(ConfigError, match="fold do not apply to a run folder"):
        open_predictor(dense_run, fold=0)
    with pytest.raises(ConfigError, match="unknown checkpoint"):
        open_predictor(dense_run, checkpoint="final")
    with pytest.raises(ConfigError, match="--tta-axes 'q'"):
        open_predictor(dense_run, tta_axes="q")
    with pytest.raises(ConfigError, match="registered twice"):
        register_opener("run", lambda p: False, OPENERS.get("run").open, "again")


def test_nnunet_results_folders_open_through_the_registered_opener(tmp_path: Path) -> None:
    folder = _nnunet_folder(tmp_path / "Trainer__Plans__3d_fullres")
    assert is_model_folder(folder)
    with pytest.raises(WeightsError, match="fold folder .*fold_0 not found"):
        open_predictor(folder)
    with pytest.raises(ConfigError, match="checkpoint_name do not apply to a nnunet folder"):
        open_predictor(folder, checkpoint_name="x.pth")


def test_inference_does_not_know_about_integrations() -> None:
    """The run-dir opener is there without the facade; nnU-Net registers only once the facade is imported."""
    code = (
        "import medseg.inference.openers as o; a = [x.name for x in o.OPENERS.values()]; "
        "import medseg.api; b = [x.name for x in o.OPENERS.values()]; print(a, b)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['run'] ['run', 'nnunet']"
