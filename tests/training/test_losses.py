"""The loss registry (lazy family discovery, import order irrelevant), nnU-Net deep-supervision weights, SAM losses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from monai.losses import DiceCELoss

from medseg.core.errors import ConfigError
from medseg.training.losses import LOSSES, DeepSupervisionLoss, build_loss, deep_supervision_weights, dice_ce
from medseg.training.losses.mpunet import MPUNetHybridLoss
from medseg.training.losses.sam import FocalDiceLoss


def test_mpunet_loss_builds_in_a_fresh_process_without_importing_its_family_first() -> None:
    code = (
        "import sys\n"
        "from medseg.training.losses import build_loss, LOSSES\n"
        "assert 'medseg.training.losses.mpunet' not in sys.modules\n"
        "loss = build_loss('mpunet_hybrid')\n"
        "assert type(loss).__name__ == 'MPUNetHybridLoss', type(loss)\n"
        "assert {'dice_ce', 'mpunet_hybrid', 'sam_dice_ce', 'sam_focal_dice'} <= set(LOSSES.names())\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_registry_lookup_imports_the_families_and_refuses_unknown_names() -> None:
    assert "sam_focal_dice" in LOSSES and len(LOSSES) >= 4
    with pytest.raises(ConfigError, match="did you mean 'dice_ce'"):
        build_loss("dice_cee")


@pytest.mark.parametrize(
    ("n", "expected"),
    [(1, [1.0]), (2, [1.0, 0.0]), (3, [2 / 3, 1 / 3, 0.0]), (5, [8 / 15, 4 / 15, 2 / 15, 1 / 15, 0.0])],
)
def test_deep_supervision_weights_follow_nnunet(n: int, expected: list[float]) -> None:
    assert deep_supervision_weights(n) == pytest.approx(expected)


def test_deep_supervision_loss_ignores_the_lowest_resolution_output() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8)).float()  # the trainer's labels are float
    outs = [torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4), torch.randn(2, 3, 2, 2, 2)]
    base = dice_ce()
    half = torch.nn.functional.interpolate(target, size=(4, 4, 4), mode="nearest")
    expected = (2 / 3) * base(outs[0], target) + (1 / 3) * base(outs[1], half)
    loss = DeepSupervisionLoss(dice_ce())
    torch.testing.assert_close(loss(outs, target), expected)
    garbage = [outs[0], outs[1], 100 * torch.randn(2, 3, 2, 2, 2)]
    torch.testing.assert_close(loss(garbage, target), expected)  # the coarsest output carries no weight
    assert isinstance(build_loss("dice_ce"), DeepSupervisionLoss)


def test_mpunet_hybrid_keeps_its_own_weights() -> None:
    loss = build_loss("mpunet_hybrid")
    assert isinstance(loss, MPUNetHybridLoss)  # not wrapped: the nnU-Net rule does not apply
    assert loss.weights(4) == [1.0, 0.5, 0.25, 0.125]
    torch.manual_seed(0)
    target = torch.randint(0, 3, (1, 1, 8, 8, 8))
    outs = [torch.randn(1, 3, 8, 8, 8) for _ in range(4)]
    base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    expected = sum(w * base(o, target) for w, o in zip((1, 0.5, 0.25, 0.125), outs, strict=True)) / 1.875
    torch.testing.assert_close(loss(outs, target), expected)


def _soft_dice(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1)


def test_sam_unet_dice_is_pooled_over_the_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 16, 16)
    target = torch.zeros(3, 1, 16, 16)
    target[0, :, 2:14, 2:14] = 1  # a large mask, a small one and an empty one: pooled and mean Dice differ
    target[1, :, 5:7, 5:7] = 1
    loss = FocalDiceLoss(dice_weight=1.0)
    focal = loss.focal(logits, target)
    prob = logits.sigmoid()
    pooled = _soft_dice(prob, target)
    per_mask = torch.stack([_soft_dice(prob[i], target[i]) for i in range(3)]).mean()
    assert abs(pooled - per_mask) > 0.05
    torch.testing.assert_close(loss(logits, target), focal + pooled)
    torch.testing.assert_close(FocalDiceLoss(dice_weight=1.0, batch_dice=False)(logits, target), focal + per_mask)
    registered = build_loss("sam_focal_dice")
    torch.testing.assert_close(registered(logits, target), focal + 20 * pooled)
