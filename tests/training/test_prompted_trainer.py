"""Box-prompted training on the slices of 3D volumes, its items and jitter, resume, and the paper losses."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data import load_manifest
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.training.losses import build_loss
from medseg.training.prompted import PromptSliceDataset
from pipelines.train import TrainRequest, train
from tests.helpers import prompted_config


def test_items_are_the_labelled_slices_of_every_volume(tiny_dataset: Path) -> None:
    cases = [c.as_dict() for c in load_manifest(tiny_dataset).cases[:2]]
    ds = PromptSliceDataset(cases, size=64, jitter="shift", seed=0)
    expected = 0
    for case in cases:
        label = np.asarray(nib.load(case["label"]).dataobj)
        expected += sum(len(set(np.unique(label[:, :, z])) - {0}) for z in range(label.shape[2]))
    assert len(ds) == expected > 0
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["label"].shape == (1, 64, 64)
    x0, y0, x1, y1 = item["box"].tolist()
    assert 0 <= x0 < x1 <= 63 and 0 <= y0 < y1 <= 63
    assert set(torch.unique(item["label"]).tolist()) <= {0.0, 1.0} and item["label"].sum() > 0
    ds.set_random_state(1)
    first = [ds[i]["box"] for i in range(5)]
    ds.set_random_state(1)
    assert all(torch.equal(a, ds[i]["box"]) for i, a in enumerate(first)), "the jitter is reproducible per seed"


def test_prompted_training_on_volumes_resumes(tiny_dataset: Path, tmp_path: Path) -> None:
    cfg = prompted_config(tmp_path / "c.yaml", model="db_sam", epochs=1, iters_per_epoch=2, max_val_slices=4)
    run = tmp_path / "run"
    first = train(TrainRequest(tiny_dataset, config=cfg, out=run, show_progress=False))
    assert first.steps == 2
    resumed = train(TrainRequest(tiny_dataset, config=cfg, out=run, epochs=2, resume=True, show_progress=False))
    assert resumed.epochs == 2 and resumed.steps == 4
    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records] == [2, 4] and set(records[-1]["val_dice"]) <= {"sphere", "box"}
    assert load_checkpoint(RunDir(run).last)["step"] == 4
    assert json.loads(RunDir(run).card.read_text())["name"] == "db_sam"


@pytest.mark.parametrize("name", ["sam_dice_ce", "sam_focal_dice"])
def test_paper_losses_fall_as_logits_match(name: str) -> None:
    loss = build_loss(name)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:10, 4:12] = 1
    good, bad = (target * 2 - 1) * 8, -(target * 2 - 1) * 8
    assert float(loss(good, target)) < 0.2 < float(loss(bad, target))
    half = loss(torch.zeros(2, 1, 16, 16, dtype=torch.float16), target)
    assert half.dtype == torch.float32 and torch.isfinite(half)


def test_each_loader_worker_jitters_with_its_own_seeded_stream(tiny_dataset: Path) -> None:
    from monai.data import DataLoader

    cases = [c.as_dict() for c in load_manifest(tiny_dataset).cases[:1]]
    ds = PromptSliceDataset(cases, size=64, jitter="enlarge", seed=0)

    def boxes(seed: int) -> list[list[float]]:
        loader = DataLoader(
            ds,
            batch_size=1,
            sampler=[0] * 16,  # one item, jittered 16 times: 8 times by each worker, alternately
            num_workers=2,
            collate_fn=torch.utils.data.default_collate,
            generator=torch.Generator().manual_seed(seed),
        )
        return [batch["box"][0].tolist() for batch in loader]

    first = boxes(1)
    assert first[0::2] != first[1::2], "both workers drew the same jitter"
    assert len({tuple(b) for b in first}) > 2
    assert boxes(1) == first and boxes(2) != first
