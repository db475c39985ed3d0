"""Data-parallel training: 2 gloo ranks (``torch.multiprocessing.spawn``, the process group set up from the same
variables ``torchrun`` sets) on the tiny dataset, against one process with the same global batch.

The comparison uses a trainer without random augmentation (a fixed pad/crop to the ROI) and a per-sample loss
(Dice per sample, not batch Dice): then 2 ranks with 1 sample each see exactly the samples one process with batch 2
sees, and the all-reduced gradient equals the one-process gradient up to float32 summation order.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.multiprocessing as mp
from monai.data import CacheDataset
from monai.losses import DiceCELoss
from monai.transforms import Compose, ResizeWithPadOrCropd

import pipelines.cli as cli
import pipelines.train as train_pipeline
from medseg.core.errors import ConfigError
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.training import distributed
from medseg.training.trainer import Trainer
from medseg.transforms.presets import preprocessing_for
from pipelines.train import TrainRequest, train
from tests.helpers import tiny_config


class Deterministic(Trainer):
    """The dense trainer with a fixed pad/crop instead of random patches and a per-sample Dice + CE loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=False)

    def build_datasets(self, train_cases: list[dict[str, Any]], val_cases: list[dict[str, Any]]) -> tuple[Any, Any]:
        _, val_ds = super().build_datasets([], val_cases)
        fixed = Compose(
            [
                preprocessing_for(self.cfg.data, self.card.intensity_preset, with_label=True),
                ResizeWithPadOrCropd(["image", "label"], spatial_size=self.window.roi_size),
            ]
        )
        return CacheDataset(train_cases, transform=fixed, progress=False), val_ds


class Recording(Deterministic):
    """Saves the parameters and gradients after every step to ``out / rank{r}.pt`` when the run ends."""

    out: ClassVar[Path | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.progress = self._record

    def _record(self, info: dict[str, Any]) -> None:
        params = list(self.model.parameters())
        weights = torch.cat([p.detach().flatten() for p in params]).clone()
        grads = torch.cat([p.grad.detach().flatten() for p in params if p.grad is not None]).clone()
        self.records.append((weights, grads))

    def fit(self) -> Any:
        result = super().fit()
        assert self.out is not None
        torch.save(self.records, self.out / f"rank{distributed.rank()}.pt")
        return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, ports: list[int], data: Path, cfg: Path, out: Path, runs: list[Path]) -> None:
    """One rank: a fresh 1-epoch run into ``runs[0]``, then the 1-process run copied to ``runs[1]`` resumed to 2
    epochs. Every file this rank opens for writing (or creates, renames) under a run directory is listed in
    ``out / writes{rank}.json``."""
    torch.set_num_threads(1)
    writes: list[str] = []
    roots = [str(r) for r in runs]

    def audit(event: str, args: tuple) -> None:
        if event in ("open", "os.rename", "os.replace", "os.mkdir", "os.remove", "shutil.copyfile"):
            path = args[0] if args else None
            if isinstance(path, (str, Path)) and any(str(path).startswith(r) for r in roots):
                writing = event != "open" or (
                    (isinstance(args[1], str) and any(c in args[1] for c in "wax+"))
                    or (args[1] is None and bool(args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
                )
                if writing:
                    writes.append(" ".join([event, *(str(a) for a in args[:2] if isinstance(a, (str, Path)))]))

    sys.addaudithook(audit)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    Recording.out = out
    train_pipeline.Trainer = Recording  # type: ignore[misc]
    os.environ["MASTER_PORT"] = str(ports[0])
    train(TrainRequest(data, config=cfg, out=runs[0], show_progress=False))
    train_pipeline.Trainer = Deterministic  # type: ignore[misc]
    os.environ["MASTER_PORT"] = str(ports[1])
    train(TrainRequest(data, config=cfg, out=runs[1], epochs=2, resume=True, show_progress=False))
    assert not torch.distributed.is_initialized(), "the process group is destroyed when training ends"
    (out / f"writes{rank}.json").write_text(json.dumps(writes))


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(tmp_path / "tiny.yaml", epochs=1, model="unet", batch_size=2, warmup_iters=1)
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    monkeypatch.setattr(train_pipeline, "Trainer", Recording)
    monkeypatch.setattr(Recording, "out", one)
    train(TrainRequest(tiny_dataset, config=cfg, out=tmp_path / "run1", show_progress=False))
    shutil.copytree(tmp_path / "run1", tmp_path / "resumed")
    runs = [tmp_path / "run2", tmp_path / "resumed"]

    mp.spawn(_worker, args=(2, [_free_port(), _free_port()], tiny_dataset, cfg, two, runs), nprocs=2, join=True)

    single = torch.load(one / "rank0.pt")
    rank0, rank1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert len(single) == len(rank0) == len(rank1) == 3  # iters_per_epoch steps
    for (w0, g0), (w1, g1) in zip(rank0, rank1, strict=True):
        assert torch.equal(w0, w1) and torch.equal(g0, g1), "both ranks hold identical weights after every step"
    # The first step starts from the same weights: the all-reduced gradient is the one-process gradient up to
    # float32 summation order (relative error ~1e-7 * sqrt(terms)); 1e-4 leaves a wide margin yet fails on any
    # real difference (another sample, a missing average over ranks: errors of order 1).
    g_one, g_two = single[0][1], rank0[0][1]
    assert (g_two - g_one).norm() / g_one.norm() < 1e-4
    # Weights after each AdamW step (measured: relative L2 difference ~3e-6, largest single weight 5e-5). AdamW
    # divides by sqrt(v), so a rounding-level difference in a near-zero gradient component can move that weight by
    # up to lr = 1e-3 per step (but not more); the weights as a whole stay at rounding level.
    for (w_one, _), (w_two, _) in zip(single, rank0, strict=True):
        assert (w_two - w_one).norm() / w_one.norm() < 1e-4
        assert (w_two - w_one).abs().max() < 1e-3

    one_rec, two_rec = RunDir(tmp_path / "run1").read_metrics(), RunDir(runs[0]).read_metrics()
    assert two_rec[0]["train_loss"] == pytest.approx(one_rec[0]["train_loss"], rel=1e-4)
    assert two_rec[0]["val_dice"] == pytest.approx(one_rec[0]["val_dice"], abs=1e-3)

    # The run directory is written once, by rank 0.
    writes0, writes1 = (json.loads((two / f"writes{r}.json").read_text()) for r in (0, 1))
    assert writes1 == []
    for name in ("config.yaml", "card.json", "metrics.jsonl", "curves.png", "log.txt", "checkpoints/last.pt"):
        assert any(str(runs[0] / name) in w for w in writes0), name
    assert sorted(p.name for p in runs[0].rglob("*")) == sorted(p.name for p in (tmp_path / "run1").rglob("*"))

    # A 1-process run resumed on 2 ranks continues after its epoch; the checkpoint holds the unwrapped model.
    ckpt = load_checkpoint(RunDir(runs[1]).last)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert not any(k.startswith(("module.", "model.")) for k in ckpt["model"])
    assert [r["epoch"] for r in RunDir(runs[1]).read_metrics()] == [1, 2]


def test_rank_slices_split_every_global_batch() -> None:
    indices = list(range(12))
    parts = [list(distributed.RankSlices(indices, 2, rank_index=r, world=3)) for r in range(3)]
    assert parts == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert [len(distributed.RankSlices(indices, 2, rank_index=r, world=3)) for r in range(3)] == [4, 4, 4]
    assert list(distributed.RankSlices(indices, 4)) == indices  # one process: the sampler unchanged


def test_batch_size_is_global_and_must_split_over_the_ranks() -> None:
    assert distributed.per_rank_batch(4, world=2) == 2
    assert distributed.per_rank_batch(3) == 3
    with pytest.raises(ConfigError, match="cannot be split over 2 processes"):
        distributed.per_rank_batch(3, world=2)


def test_single_process_helpers_are_the_identity() -> None:
    assert not distributed.is_distributed() and distributed.rank() == 0 and distributed.world_size() == 1
    assert distributed.rank_seed(123, 0, 5, 1) == 123
    assert distributed.gather_items({1: "a"}) == {1: "a"}
    assert distributed.mean_over_ranks(2.5) == 2.5 and distributed.broadcast([1]) == [1]


def test_nproc_relaunches_the_command_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []

    class Done:
        returncode = 3

    def fake_run(command: list[str], check: bool) -> Done:
        seen.append(command)
        return Done()

    monkeypatch.setattr("subprocess.run", fake_run)
    argv = ["--debug", "train", "DATA", "--nproc", "2", "--epochs", "1", "--nproc=2"]
    assert cli._launch_torchrun(2, argv) == 3
    command = seen[0]
    assert command[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc-per-node=2" in command and "--standalone" in command
    assert command[command.index("-m", 3) :] == ["-m", "pipelines.cli", "--debug", "train", "DATA", "--epochs", "1"]
