"""D-Former specifics: paper size, group partition, padding / masking, deep supervision, input and config errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models import count_parameters, create_model, get_card, tiny_overrides
from medseg.models.dformer import DFormer3D, DFormerBlock3D, PatchMerging, partition_groups, reverse_groups

PAPER_PARAMS = 50.56e6  # measured on the released definition (14 classes, three heads), docs/models/dformer.md


def _tiny(**extra: object) -> DFormer3D:
    torch.manual_seed(0)
    return create_model("dformer", **tiny_overrides("dformer"), **extra)


def test_paper_config_parameter_count() -> None:
    with torch.device("meta"):
        model = DFormer3D(in_channels=1, out_channels=14, deep_supervision=True)
        single_head = DFormer3D(in_channels=1, out_channels=14)
    n = count_parameters(model)
    assert n == 50_557_248 == get_card("dformer").reference_params
    assert round(n / 1e4) == round(PAPER_PARAMS / 1e4)  # the reference is quoted to 0.01 M
    assert count_parameters(single_head) == 44_649_792
    assert round(count_parameters(single_head) / 1e5) == 446  # "single full-res head only ~ 44.6 M"
    assert [sum(p.numel() for p in h.parameters()) for h in model.heads] == [296_448, 1_182_720, 4_724_736]


def test_card() -> None:
    card = get_card("dformer")
    assert (card.in_channels, card.out_channels, card.roi_size) == (1, 14, (64, 128, 128))
    assert card.divisible_by == (16, 32, 32) and card.intensity_preset == "ct"
    assert card.label_names[0] == "background" and len(card.label_names) == 14
    assert card.reference_config["deep_supervision"] is True
    assert "arXiv:2201.00462" in card.paper
    model = _tiny(out_channels=3)
    assert model.divisible_by == model.card.divisible_by == (16, 32, 32)
    assert model.card.label_names == ("background", "label_1", "label_2")


def test_deep_supervision_list_in_training_tensor_in_eval() -> None:
    model = _tiny(out_channels=3, deep_supervision=True).train()
    x = torch.randn(1, 1, 16, 32, 32)
    outs = model(x)
    assert isinstance(outs, list)
    assert [tuple(o.shape) for o in outs] == [(1, 3, 16, 32, 32), (1, 3, 8, 16, 16), (1, 3, 4, 8, 8)]
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, Tensor) and y.shape == (1, 3, 16, 32, 32)
    assert len(_tiny().heads) == 1  # no auxiliary heads (nor unused parameters) without deep supervision


def _coords(grid: tuple[int, int, int]) -> Tensor:
    """``(1, D, H, W, 3)`` map holding each token's own (d, h, w) index."""
    axes = torch.meshgrid(*[torch.arange(n) for n in grid], indexing="ij")
    return torch.stack(axes, dim=-1)[None]


def test_global_groups_are_dilated_lattices() -> None:
    grid, group = (4, 16, 8), (2, 8, 4)
    interval = (2, 2, 2)
    groups = partition_groups(_coords(grid), group, dilated=True)[0]  # (G, T, 3)
    assert groups.shape == (8, 64, 3)
    for j, members in enumerate(groups):
        offset = torch.tensor(list(itertools.product(*[range(i) for i in interval]))[j])  # group index = fine axis
        for axis in range(3):
            values = members[:, axis].unique()
            # group j holds offset + k * interval along each axis, k = 0 .. group - 1: spread over the whole volume
            expected = offset[axis] + interval[axis] * torch.arange(group[axis])
            torch.testing.assert_close(values, expected)
    # token 1 of group 0 is the next token along W, one interval away
    assert groups[0, 1].tolist() == [0, 0, interval[2]]


def test_local_groups_are_contiguous_blocks() -> None:
    grid, group = (4, 16, 8), (2, 8, 4)
    groups = partition_groups(_coords(grid), group, dilated=False)[0]
    assert groups.shape == (8, 64, 3)
    for j, members in enumerate(groups):
        block = list(itertools.product(range(2), range(2), range(2)))[j]
        lo = torch.tensor(block) * torch.tensor(group)
        assert (members.amin(0) == lo).all() and (members.amax(0) == lo + torch.tensor(group) - 1).all()


@pytest.mark.parametrize("dilated", [False, True])
def test_partition_round_trip(dilated: bool) -> None:
    x = torch.randn(2, 4, 16, 8, 3)
    groups = partition_groups(x, (2, 8, 4), dilated)
    torch.testing.assert_close(reverse_groups(groups, (4, 16, 8), (2, 8, 4), dilated), x)


# Each case: grid (not a multiple of the group (2, 4, 4)), then a group's real tokens as slices. On its own the
# sub-grid is smaller than the group, so the block attends over exactly those tokens: equal to the masked group.
_MASK_CASES = [
    (False, (2, 6, 8), (slice(0, 2), slice(4, 6), slice(0, 4))),  # local group with padded H rows
    (True, (2, 6, 8), (slice(0, 2), slice(0, 6, 2), slice(0, 8, 2))),  # dilated group, interval (1, 2, 2), H padded
    (False, (3, 8, 8), (slice(2, 3), slice(0, 4), slice(4, 8))),  # local group with padded D
    (True, (3, 8, 8), (slice(1, 3, 2), slice(1, 8, 2), slice(0, 8, 2))),  # dilated group, interval (2, 2, 2), D pad
]


@pytest.mark.parametrize(("dilated", "grid", "sub"), _MASK_CASES)
def test_padded_keys_are_masked(dilated: bool, grid: tuple[int, int, int], sub: tuple[slice, ...]) -> None:
    torch.manual_seed(0)
    block = DFormerBlock3D(dim=8, num_heads=2, group_size=(2, 4, 4), dilated=dilated).eval()
    x = torch.randn(2, *grid, 8)
    with torch.no_grad():
        out = block._attend(x)
        alone = block._attend(x[:, sub[0], sub[1], sub[2]].contiguous())
    assert out.shape == x.shape and torch.isfinite(out).all()
    torch.testing.assert_close(out[:, sub[0], sub[1], sub[2]], alone)


def test_small_grid_switches_to_full_attention() -> None:
    torch.manual_seed(0)
    block = DFormerBlock3D(dim=8, num_heads=2, group_size=(2, 8, 8), dilated=True).eval()
    x = torch.randn(1, 4, 4, 4, 8)
    with torch.no_grad():
        out = block._attend(x)
        tokens = x.reshape(1, 1, 64, 8)
        expected = block.attn(tokens).reshape(x.shape)
        # per call, not permanent: a larger grid afterwards is grouped again (and still works)
        assert block._attend(torch.randn(1, 4, 16, 16, 8)).shape == (1, 4, 16, 16, 8)
    torch.testing.assert_close(out, expected)


def test_patch_merging_concatenates_cells_in_paper_order() -> None:
    torch.manual_seed(0)
    merge = PatchMerging(dim=2).eval()
    x = torch.randn(1, 4, 4, 6, 2)
    parts = [x[:, d::2, h::2, w::2] for d, h, w in itertools.product(range(2), repeat=3)]
    with torch.no_grad():
        expected = merge.reduction(merge.norm(torch.cat(parts, dim=-1)))
        torch.testing.assert_close(merge(x), expected)
        assert merge(torch.randn(1, 3, 5, 7, 2)).shape == (1, 2, 3, 4, 4)  # odd D padded too


def test_odd_token_grids_are_padded_inside_the_network() -> None:
    model = _tiny(out_channels=2, deep_supervision=True).train()
    x = torch.randn(1, 1, 18, 36, 44)  # token grid (9, 9, 11): odd on every axis at several stages
    outs = model._segment(x)
    assert outs[0].shape == (1, 2, 18, 36, 44)
    assert all(torch.isfinite(o).all() for o in outs)
    with torch.no_grad():
        assert model.eval()._segment(x).shape == (1, 2, 18, 36, 44)


@pytest.mark.parametrize("shape", [(16, 32, 40), (24, 32, 32), (8, 32, 32)])
def test_rejects_indivisible_input(shape: tuple[int, int, int]) -> None:
    model = _tiny()
    with pytest.raises(ModelInputError, match="dformer.*not divisible"):
        model(torch.randn(1, 1, *shape))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"depths": (2, 2, 2), "num_heads": (1, 2, 4, 8)},
        {"embed_dim": 10, "num_heads": (3, 6, 12, 24)},
        {"group_size": (2, 8)},
        {"drop_path_rate": 1.5},
    ],
)
def test_invalid_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="dformer"):
        create_model("dformer", **kwargs)
