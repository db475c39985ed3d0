"""Classification end to end: metrics against scikit-learn, a short MedViTV2 run on real images that learns, resume,
the predictor contract, and ``medseg predict`` / ``evaluate`` / ``verify-data`` on the run.

The images are tiles of two real photographs scikit-image ships: immunohistochemistry (``ihc.png``, brown DAB and
blue haematoxylin) and a fundus photograph (``retina.jpg``, red-orange retina on black). The class is the tissue,
which the tiny MedViTV2 learns from colour and texture within a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import yaml
from PIL import Image
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

from medseg import open_predictor
from medseg.core.config import ExperimentConfig
from medseg.core.errors import ConfigError, DataError, ModelInputError
from medseg.data.classification import load_classification_dataset
from medseg.inference.classify import ClassificationPredictor
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.models import tiny_overrides
from medseg.training.classification import (
    RECIPE,
    ClassificationTrainer,
    apply_recipe,
    classification_metrics,
    prepare_classification,
)
from pipelines import train as train_pipeline
from pipelines.train import TrainRequest, train
from tests.helpers import run_cli

torch.set_num_threads(1)

SIZE = 128
DATA_DIR = Path(skimage.data.data_dir)


def _tiles() -> dict[str, list[np.ndarray]]:
    ihc = np.asarray(Image.open(DATA_DIR / "ihc.png").convert("RGB"))  # 512 x 512
    retina = np.asarray(Image.open(DATA_DIR / "retina.jpg").convert("RGB"))[200:1224, 200:1224]  # inside the fundus
    return {
        "ihc": [ihc[r : r + 128, c : c + 128] for r in range(0, 512, 128) for c in range(0, 512, 128)],
        "fundus": [retina[r : r + 256, c : c + 256] for r in range(0, 1024, 256) for c in range(0, 1024, 256)],
    }


@pytest.fixture(scope="module")
def tissue_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """class folders: 10 training, 3 validation and 3 test tiles per class (16 tiles of each photograph)."""
    root = tmp_path_factory.mktemp("tissue") / "tissue"
    for name, tiles in _tiles().items():
        order = np.random.default_rng(0).permutation(len(tiles))
        for i, t in enumerate(order):
            split = "train" if i < 10 else "val" if i < 13 else "test"
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(tiles[t])).save(folder / f"{name}_{t:02d}.png")
    return root


def _config(path: Path, *, epochs: int, iters: int, batch: int = 8, **train: object) -> Path:
    kwargs = tiny_overrides("medvit2_tiny")
    cfg = {
        "name": "tissue",
        "model": {
            "name": "medvit2_tiny",
            "roi_size": [SIZE, SIZE],
            "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        },
        "train": {
            "epochs": epochs,
            "iters_per_epoch": iters,
            "batch_size": batch,
            "lr": 1e-3,
            "weight_decay": 0.05,
            "warmup_iters": 0,
            "val_every": 1,
            "seed": 1,
            **train,
        },
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def tissue_run(tissue_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    cfg = _config(tmp / "c.yaml", epochs=3, iters=18, batch=4, label_smoothing=0.1)
    train(TrainRequest(tissue_dataset, config=cfg, out=tmp / "run", show_progress=False))
    return tmp / "run"


def test_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(7)
    y = np.array([0, 0, 1, 2, 2, 2, 1, 0, 2, 1, 1, 0])
    probs = rng.dirichlet(np.ones(3), size=len(y))
    m = classification_metrics(y, probs, ("a", "b", "c"))
    pred = probs.argmax(1)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
    assert m["auroc"] == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert np.sum(m["confusion_matrix"]) == len(y) and np.trace(m["confusion_matrix"]) == np.sum(pred == y)
    binary = np.array([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8], [0.55, 0.45]])
    yb = np.array([0, 1, 1, 1, 0])
    assert classification_metrics(yb, binary, ("n", "p"))["auroc"] == pytest.approx(roc_auc_score(yb, binary[:, 1]))
    # a class absent from the references: no AUROC for it, F1 0 for it, balanced accuracy over the present ones
    m = classification_metrics([0, 0, 1], np.array([[0.8, 0.1, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1]]), "abc")
    assert m["auroc"] == pytest.approx(1.0) and m["macro_f1"] == pytest.approx(
        f1_score([0, 0, 1], [0, 2, 1], labels=[0, 1, 2], average="macro", zero_division=0)
    )
    assert classification_metrics([1, 1], np.array([[0.2, 0.8], [0.6, 0.4]]), "ab")["auroc"] is None
    with pytest.raises(DataError, match="class indices 0..1"):
        classification_metrics([0, 2], np.array([[0.5, 0.5], [0.5, 0.5]]), "ab")


def test_recipe(tissue_dataset: Path) -> None:
    cfg = apply_recipe(ExperimentConfig().updated({"model": {"name": "medvit2_tiny"}}), n_train=50)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.warmup_iters, t.grad_clip, t.batch_size, t.epochs) == (1e-4, 0.05, 0, None, 24, 100)
    assert t.iters_per_epoch == 3 and t.lr * t.min_lr_ratio == pytest.approx(5e-6)
    assert apply_recipe(cfg.updated({"train": {"epochs": 7}}), n_train=5, keep_epochs=True).train.epochs == 7
    assert RECIPE["schedule"] == "cosine"
    dataset = load_classification_dataset(tissue_dataset)
    bad = ExperimentConfig().updated({"model": {"name": "medvit2_tiny", "roi_size": [96, 96]}})
    with pytest.raises(ConfigError, match=r"roi_size \[96, 96\] .*at least \[128, 128\]"):
        prepare_classification(bad, dataset, recipe=False)
    with pytest.raises(ConfigError, match="train.fg_ratio"):
        prepare_classification(
            bad.updated({"model": {"roi_size": [128, 128]}, "train": {"fg_ratio": 0.9}}), dataset, recipe=False
        )
    with pytest.raises(ConfigError, match="volume preset"):
        prepare_classification(
            bad.updated({"model": {"roi_size": [128, 128]}, "data": {"preset": "mri"}}), dataset, recipe=False
        )
    with pytest.raises(ConfigError, match="segmentation model"):
        prepare_classification(ExperimentConfig(), dataset, recipe=False)


def test_training_learns_the_tissue_and_writes_the_run(tissue_run: Path) -> None:
    run = RunDir(tissue_run)
    records = run.read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_accuracy"] > 0.5  # 3 + 3 validation tiles: chance is 0.5
    assert records[-1]["lr"] < records[0]["lr"]  # cosine per iteration
    report = json.loads((tissue_run / "metrics.json").read_text())
    assert report["val"]["class_names"] == ["fundus", "ihc"] and report["test"]["n"] == 6
    assert report["test"]["accuracy"] > 0.5 and report["test"]["auroc"] > 0.5
    for png in ("confusion.png", "confusion_test.png", "curves.png"):
        assert (tissue_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = json.loads(run.card.read_text())
    assert card["task"] == "classification" and card["label_names"] == ["fundus", "ihc"]
    saved = yaml.safe_load(run.config.read_text())
    assert saved["data"]["preset"] == "rgb_mean05_std05" and saved["train"]["label_smoothing"] == 0.1


class _Interrupted(Exception):
    pass


class _CutInEpoch2(ClassificationTrainer):
    def batch_loss(self, batch: dict) -> torch.Tensor:
        if self.epoch == 1:
            raise _Interrupted
        return super().batch_loss(batch)


def test_resume_continues_exactly(tissue_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(tmp_path / "c.yaml", epochs=2, iters=2, batch=4)
    whole = train(TrainRequest(tissue_dataset, config=cfg, out=tmp_path / "whole", show_progress=False))
    with monkeypatch.context() as m:
        m.setattr(train_pipeline, "ClassificationTrainer", _CutInEpoch2)
        with pytest.raises(_Interrupted):
            train(TrainRequest(tissue_dataset, config=cfg, out=tmp_path / "part", show_progress=False))
    assert load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["epoch"] == 1
    resumed = train(TrainRequest(tissue_dataset, out=tmp_path / "part", resume=True, show_progress=False))
    assert (whole.epochs, whole.steps) == (resumed.epochs, resumed.steps) == (2, 4)
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["epoch"] for r in RunDir(tmp_path / "part").read_metrics()] == [1, 2]


def test_predictor_contract(tissue_run: Path, tissue_dataset: Path) -> None:
    predictor = open_predictor(tissue_run, device="cpu")
    assert isinstance(predictor, ClassificationPredictor) and predictor.task == "classification"
    assert predictor.label_names == ("fundus", "ihc") and not predictor.needs_prompts
    tiles = [
        (t, label)
        for label, name in enumerate(("fundus", "ihc"))
        for t in (tissue_dataset / "test" / name).glob("*.png")
    ]
    predictions = [(predictor.predict_class(t), label) for t, label in tiles]
    correct = sum(p.label == label for p, label in predictions)
    assert correct >= 0.6 * len(tiles), [(p.label_name, label) for p, label in predictions]  # chance is 0.5
    tile, _ = tiles[-1]
    result = predictor.predict_class(tile)
    assert (
        result.label == int(np.argmax(result.probabilities))
        and result.label_name == predictor.label_names[result.label]
    )
    assert sum(result.probabilities) == pytest.approx(1.0, abs=1e-5)
    assert result.to_dict()["probabilities"].keys() == {"fundus", "ihc"}
    array = np.asarray(Image.open(tile))
    assert predictor.predict_class(array).probabilities == pytest.approx(result.probabilities, abs=1e-5)
    with pytest.raises(ModelInputError, match="is a classifier.*predict_class"):
        predictor.predict(tile)
    from monai.data import MetaTensor

    with pytest.raises(ModelInputError, match="classifies 2D images"):
        predictor.predict_class(MetaTensor(torch.rand(3, 16, 16, 4)))
    with pytest.raises(ModelInputError, match="2 channels"):
        predictor.predict_class(MetaTensor(torch.rand(2, 16, 16, 1)))
    with pytest.raises(ConfigError, match="dense models only"):
        open_predictor(tissue_run, precision="fp32")


def test_cli_predict_evaluate_verify(
    tissue_run: Path, tissue_dataset: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    tiles = sorted((tissue_dataset / "test" / "fundus").glob("*.png"))[:2]
    code, out = run_cli(["predict", str(tissue_run), *map(str, tiles), "--out", str(tmp_path)], capsys, monkeypatch)
    assert code == 0, out
    saved = json.loads((tmp_path / f"{tiles[0].stem}_class.json").read_text())
    assert saved["label_name"] == "fundus" and set(saved["probabilities"]) == {"fundus", "ihc"}
    assert "fundus" in out and tiles[1].name in out
    code, out = run_cli(["evaluate", str(tissue_run), str(tissue_dataset)], capsys, monkeypatch)
    assert code == 0, out
    report = json.loads((tissue_run / "evaluation" / "tissue.json").read_text())
    assert report["split"] == "test" and report["n"] == 6 and report["accuracy"] > 0.5
    assert "balanced" in out.lower() and "AUROC" in out
    code, out = run_cli(["verify-data", str(tissue_dataset)], capsys, monkeypatch)
    assert code == 0 and "class_folders" in out and "no problems found" in out, out
    (tissue_dataset / "val" / "ihc" / "zz_broken.png").write_bytes(b"broken")
    try:
        code, out = run_cli(["verify-data", str(tissue_dataset)], capsys, monkeypatch)
        assert code == 1 and "val/ihc/zz_broken: unreadable" in out, out
    finally:
        (tissue_dataset / "val" / "ihc" / "zz_broken.png").unlink()


def test_model_and_dataset_kinds_must_agree(tissue_dataset: Path, tmp_path: Path) -> None:
    seg = tmp_path / "seg"
    (seg / "images").mkdir(parents=True)
    (seg / "labels").mkdir()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "images" / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(seg / "labels" / "a.png")
    with pytest.raises(DataError, match="classifies images but .* is a segmentation dataset"):
        train(TrainRequest(seg, model="medvit2_tiny", out=tmp_path / "r1", show_progress=False))
    with pytest.raises(ConfigError, match="'unet' is a segmentation model"):
        train(TrainRequest(tissue_dataset, model="unet", out=tmp_path / "r2", show_progress=False))
