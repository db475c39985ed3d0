"""Every epoch's random draws are a function of ``(train.seed, epoch)``: they differ between epochs, repeat between
runs with the same seed, and a resumed run draws, from its next epoch on, what an uninterrupted run drew.

The trainers are wrapped to record, at every step, the augmentation decisions of the batch (which random transform
fired, the crop offsets, a digest of the augmented tensors; for the prompted trainer the sampled items and the
jittered boxes) and a digest of torch's global RNG state (what the dropout / DropPath masks are drawn from).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

import pipelines.train as train_pipeline
from medseg.inference.rundir import RunDir, load_checkpoint
from medseg.training.prompted import BOX, PromptTrainer
from medseg.training.trainer import Trainer, epoch_seeds
from pipelines.train import TrainRequest, train
from tests.helpers import prompted_config, tiny_config

Draws = dict[int, list[Any]]  # epoch (0-based) -> one record per step


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _dense_draws(batch: dict[str, Any]) -> tuple:
    """(which random transform fired, per item; then the crop offsets and the augmented tensors' digests).

    The first part does not depend on which case was sampled, only on the transforms' random streams.
    """
    fired, crops = [], []
    for ops in batch["image"].applied_operations:
        rand = [op for op in ops if op["class"].startswith("Rand")]
        fired.append(tuple((op["class"], bool(op["do_transforms"])) for op in rand))
        crops.append(tuple(str(op.get("extra_info", {}).get("extra_info", {}).get("cropped")) for op in rand))
    digests = _digest(batch["image"].as_tensor()), _digest(batch["label"].as_tensor())
    return tuple(fired), (tuple(crops), digests)


def _prompted_draws(batch: dict[str, Any]) -> tuple:
    """(the jittered boxes; then the sampled (slice, label) items and the images' digest)."""
    return tuple(map(tuple, batch[BOX].tolist())), (tuple(batch["index"].tolist()), _digest(batch["image"]))


class Interrupted(Exception):
    """Stands for a run killed part-way (after the checkpoint of its last finished epoch)."""


def _recording(base: type[Trainer], log: Draws, stop_at: int | None) -> type[Trainer]:
    summary = _prompted_draws if issubclass(base, PromptTrainer) else _dense_draws

    class Recording(base):  # type: ignore[misc, valid-type]
        def batch_loss(self, batch: dict[str, Any]) -> torch.Tensor:
            if self.epoch == stop_at:
                raise Interrupted
            rng = _digest(torch.get_rng_state())  # before this step's dropout masks are drawn
            log.setdefault(self.epoch, []).append((summary(batch), rng))
            return super().batch_loss(batch)

    return Recording


def _run(
    monkeypatch: pytest.MonkeyPatch, data: Path, cfg: Path, out: Path, stop_at: int | None = None, resume: bool = False
) -> Draws:
    log: Draws = {}
    monkeypatch.setattr(train_pipeline, "Trainer", _recording(Trainer, log, stop_at))
    monkeypatch.setattr(train_pipeline, "PromptTrainer", _recording(PromptTrainer, log, stop_at))
    request = TrainRequest(data, config=cfg, out=out, show_progress=False, resume=resume)
    if stop_at is None:
        train(request)
    else:
        with pytest.raises(Interrupted):
            train(request)
    return log


def _check_the_three_properties(monkeypatch: pytest.MonkeyPatch, data: Path, cfg: Path, tmp_path: Path) -> None:
    full = _run(monkeypatch, data, cfg, tmp_path / "full")  # 3 epochs
    assert sorted(full) == [0, 1, 2]
    augmentation = [[draw[0] for draw, _ in full[e]] for e in range(3)]
    rng = [[state for _, state in full[e]] for e in range(3)]
    pairs = ((0, 1), (1, 2), (0, 2))
    for a, b in pairs:
        assert augmentation[a] != augmentation[b], f"epochs {a + 1} and {b + 1} drew the same augmentation"
    for a, b in pairs:
        assert rng[a][0] != rng[b][0], f"epochs {a + 1} and {b + 1} start from the same dropout RNG state"

    first = _run(monkeypatch, data, cfg, tmp_path / "cut", stop_at=2)  # the same seed, killed in epoch 3
    assert first == {0: full[0], 1: full[1]}, "two runs with the same seed drew differently"
    assert load_checkpoint(RunDir(tmp_path / "cut").last)["epoch"] == 2
    resumed = _run(monkeypatch, data, cfg, tmp_path / "cut", resume=True)
    assert resumed == {2: full[2]}, "the resumed epoch drew differently from the uninterrupted run"

    a, b = load_checkpoint(RunDir(tmp_path / "full").last), load_checkpoint(RunDir(tmp_path / "cut").last)
    assert a["step"] == b["step"] == 3 * 2
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, msg=key)
    losses = [[r["train_loss"] for r in RunDir(tmp_path / run).read_metrics()] for run in ("full", "cut")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_dense_draws_differ_per_epoch_repeat_per_seed_and_survive_resume(
    num_workers: int, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tiny_config(
        tmp_path / "c.yaml", epochs=3, iters_per_epoch=2, val_every=10, num_workers=num_workers, device="cpu"
    )  # CPU: bitwise-equal weights need deterministic kernels, which CUDA does not promise by default
    _check_the_three_properties(monkeypatch, tiny_dataset, cfg, tmp_path)


def test_prompted_draws_differ_per_epoch_repeat_per_seed_and_survive_resume(
    tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = prompted_config(
        tmp_path / "c.yaml", model="db_sam", epochs=3, iters_per_epoch=2, max_val_slices=2, device="cpu"
    )
    _check_the_three_properties(monkeypatch, tiny_dataset, cfg, tmp_path)


def test_epoch_seeds_are_distinct_streams() -> None:
    seeds = {s for seed in (0, 1) for epoch in range(50) for s in epoch_seeds(seed, epoch)}
    assert len(seeds) == 2 * 50 * 3
    assert epoch_seeds(7, 3) == epoch_seeds(7, 3)
