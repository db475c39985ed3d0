"""STU-Net specifics: official sizes and key layout, forward conventions, the official-checkpoint loader."""

from __future__ import annotations

import hashlib
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models import count_parameters, create_model, get_card
from medseg.models.stunet import (
    STUNET_VARIANTS,
    STUNet,
    load_stunet_checkpoint,
    pools_from_nnunet_plan,
)

TINY_DIMS = (4, 8, 16, 32, 64, 64)
README_MILLIONS = {"stunet_s": 14.60, "stunet_b": 58.26, "stunet_l": 440.30, "stunet_h": 1457.33}


def official_layout(c_in: int, c_out: int, dims: tuple[int, ...], depth: tuple[int, ...]) -> dict[str, tuple]:
    """Key -> shape of the official STU-Net state dict, written from the official rules (docs/models/stunet.md)."""
    layout: dict[str, tuple] = {}

    def block(prefix: str, cin: int, cout: int, shortcut: bool) -> None:
        layout[f"{prefix}.conv1.weight"], layout[f"{prefix}.conv1.bias"] = (cout, cin, 3, 3, 3), (cout,)
        layout[f"{prefix}.norm1.weight"], layout[f"{prefix}.norm1.bias"] = (cout,), (cout,)
        layout[f"{prefix}.conv2.weight"], layout[f"{prefix}.conv2.bias"] = (cout, cout, 3, 3, 3), (cout,)
        layout[f"{prefix}.norm2.weight"], layout[f"{prefix}.norm2.bias"] = (cout,), (cout,)
        if shortcut:
            layout[f"{prefix}.conv3.weight"], layout[f"{prefix}.conv3.bias"] = (cout, cin, 1, 1, 1), (cout,)

    def stage(prefix: str, cin: int, cout: int, n: int) -> None:
        block(f"{prefix}.0", cin, cout, shortcut=True)
        for b in range(1, n):
            block(f"{prefix}.{b}", cout, cout, shortcut=False)

    for s in range(6):
        stage(f"conv_blocks_context.{s}", c_in if s == 0 else dims[s - 1], dims[s], depth[s])
    for u in range(5):
        low, high = dims[4 - u], dims[5 - u]
        layout[f"upsample_layers.{u}.conv.weight"], layout[f"upsample_layers.{u}.conv.bias"] = (
            (low, high, 1, 1, 1),
            (low,),
        )
        stage(f"conv_blocks_localization.{u}", 2 * low, low, depth[4 - u])
        layout[f"seg_outputs.{u}.weight"], layout[f"seg_outputs.{u}.bias"] = (c_out, low, 1, 1, 1), (c_out,)
    return layout


def synthetic_state(c_in: int, c_out: int, dims: tuple[int, ...] = TINY_DIMS, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    layout = official_layout(c_in, c_out, dims, (1,) * 6)
    return {k: torch.randn(shape, generator=gen) * 0.1 for k, shape in layout.items()}


def tiny(in_channels: int = 1, out_channels: int = 3, **kwargs: object) -> STUNet:
    torch.manual_seed(0)
    kwargs.setdefault("dims", TINY_DIMS)
    return create_model("stunet_s", in_channels=in_channels, out_channels=out_channels, **kwargs)


# -- sizes and layout ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(STUNET_VARIANTS))
def test_parameter_counts_match_the_release(name: str) -> None:
    model = create_model(name, device="meta")  # 1 in / 105 out from the card; no memory even for the 1.46 B model
    n = count_parameters(model)
    assert n == get_card(name).reference_params
    assert abs(n / 1e6 - README_MILLIONS[name]) <= 0.001 * README_MILLIONS[name]
    assert model.dims == STUNET_VARIANTS[name]["dims"] and model.depth == STUNET_VARIANTS[name]["depth"]


def test_stunet_b_state_dict_is_the_official_layout() -> None:
    model = create_model("stunet_b", device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_layout(1, 105, (32, 64, 128, 256, 512, 512), (1,) * 6)


def test_stunet_h_layout_has_three_blocks_per_stage() -> None:
    got = {k: tuple(v.shape) for k, v in create_model("stunet_h", device="meta").state_dict().items()}
    assert got == official_layout(1, 105, (96, 192, 384, 768, 1536, 1536), (3,) * 6)


def test_cards() -> None:
    for name in STUNET_VARIANTS:
        card = get_card(name)
        assert (card.in_channels, card.out_channels, card.roi_size) == (1, 105, (128, 128, 128))
        assert card.divisible_by == (16, 16, 32)  # product of the TotalSegmentator plan's pools [2,2,2]x4 + [1,1,2]
        assert card.intensity_preset == "zscore" and card.target_spacing == (1.5, 1.5, 1.5)
        assert card.label_names[0] == "background" and card.label_names[-1] == "label_104"
        assert "arXiv:2304.06716" in card.paper


# -- forward conventions ---------------------------------------------------------------------------------------------


def test_deep_supervision_in_training_plain_logits_in_eval() -> None:
    model = tiny().train()
    x = torch.randn(2, 1, 16, 16, 64)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 5
    assert all(o.shape == (2, 3, 16, 16, 64) for o in outs)
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 16, 16, 64)
    torch.testing.assert_close(y, outs[0].detach())  # InstanceNorm: train and eval agree


def test_nnunet_outputs_native_resolutions_in_any_mode() -> None:
    model = tiny(nnunet_outputs=True)
    x = torch.randn(1, 1, 16, 16, 64)
    expected = [(16, 16, 64), (8, 8, 32), (4, 4, 16), (2, 2, 8), (1, 1, 4)]
    with torch.no_grad():
        for mode in (True, False):
            outs = model.train(mode)(x)
            assert [tuple(o.shape[2:]) for o in outs] == expected
        model.decoder.deep_supervision = False  # what nnU-Net's set_deep_supervision_enabled(False) does
        assert not model.deep_supervision
        assert model(x).shape == (1, 3, 16, 16, 64)


def test_plan_pools_and_anisotropic_input() -> None:
    v2_plan = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [1, 2, 2]]
    pools = pools_from_nnunet_plan(v2_plan)
    assert pools == [[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
    assert pools_from_nnunet_plan([[2, 2, 2], [2, 2, 2]], nnunet_v2=False) == [[2, 2, 2]] * 2 + [[1, 1, 1]] * 3
    model = tiny(pool_op_kernel_sizes=pools, conv_kernel_sizes=[3] * 6)
    assert model.divisible_by == (16, 32, 32) and model.card.divisible_by == (16, 32, 32)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 1, 16, 32, 64)).shape == (1, 3, 16, 32, 64)


def test_bad_configuration_and_input() -> None:
    with pytest.raises(ConfigError, match="pools_from_nnunet_plan"):
        tiny(pool_op_kernel_sizes=[[2, 2, 2]] * 6)
    with pytest.raises(ConfigError, match="6 positive widths"):
        tiny(dims=(4, 8, 16))
    with pytest.raises(ConfigError, match="odd"):
        tiny(conv_kernel_sizes=[2] * 6)
    with pytest.raises(ModelInputError, match="single bottleneck voxel"):
        tiny().eval()(torch.randn(1, 1, 16, 16, 32))
    with pytest.raises(ModelInputError, match="divisible"):
        tiny().eval()(torch.randn(1, 1, 16, 16, 48))


# -- official checkpoints --------------------------------------------------------------------------------------------


def _save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_direct_load_of_a_v1_checkpoint_with_numpy_logs(tmp_path: Path) -> None:
    state = synthetic_state(1, 3)
    logs = ([np.float64(0.5)], [np.float32(0.4)], np.array([1.0]))  # nnU-Net v1 stores its curves as numpy values
    path = _save({"state_dict": state, "plot_stuff": logs, "epoch": np.int64(4000)}, tmp_path / "small_ep4k.model")
    model = tiny()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    load_stunet_checkpoint(torch.nn.DataParallel(model), path, finetune=False, sha256=digest)  # wrapper unwrapped
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_finetune_skips_heads_and_repeats_the_stem(tmp_path: Path) -> None:
    state = synthetic_state(1, 105)  # a pre-trained TotalSegmentator model: 1 in / 105 out
    prefixed = {f"module.{k}": v for k, v in state.items()}  # saved from a DDP-wrapped network
    path = _save({"network_weights": prefixed, "current_epoch": 10}, tmp_path / "checkpoint_final.pth")
    model = tiny(in_channels=2, out_channels=4)
    heads_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("seg_outputs.")}
    load_stunet_checkpoint(model, path)
    loaded = model.state_dict()
    for key, value in loaded.items():
        if key.startswith("seg_outputs."):
            torch.testing.assert_close(value, heads_before[key])
        elif key.startswith("conv_blocks_context.0.0.conv") and key.endswith("weight") and "conv2" not in key:
            assert value.shape[1] == 2
            torch.testing.assert_close(value, state[key].repeat(1, 2, 1, 1, 1))
        else:
            torch.testing.assert_close(value, state[key], msg=key)
    # Repetition means a 2-channel input (x, 0) sees exactly the pre-trained 1-channel encoder.
    reference = tiny(in_channels=1, out_channels=4)
    load_stunet_checkpoint(reference, path)
    reference.seg_outputs.load_state_dict(model.seg_outputs.state_dict())
    x = torch.randn(1, 1, 16, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(torch.cat([x, torch.zeros_like(x)], 1)), reference.eval()(x))


def test_finetune_false_refuses_other_heads(tmp_path: Path) -> None:
    path = _save(synthetic_state(1, 105), tmp_path / "bare.pt")  # bare state dict
    with pytest.raises(WeightsError, match=r"mis-shaped: seg_outputs\.0\.weight") as info:
        load_stunet_checkpoint(tiny(out_channels=4), path, finetune=False)
    assert "finetune=True" in str(info.value) and "1 in / 105 out" in str(info.value)


def test_missing_extra_and_misshaped_keys_are_listed(tmp_path: Path) -> None:
    state = synthetic_state(1, 3)
    for key in [k for k in state if k.startswith(("conv_blocks_context.4.", "conv_blocks_context.5."))]:
        del state[key]
    state["conv_blocks_context.2.1.conv1.weight"] = torch.zeros(16, 16, 3, 3, 3)
    state["upsample_layers.0.conv.weight"] = torch.zeros(32, 64, 3, 3, 3)
    path = _save(state, tmp_path / "broken.pt")
    with pytest.raises(WeightsError) as info:
        load_stunet_checkpoint(tiny(), path)
    msg = str(info.value)
    assert "20 missing: conv_blocks_context.4.0.conv1.weight" in msg and " ..." in msg  # the first 10 listed
    assert "conv_blocks_context.5.0.conv1.weight" not in msg
    assert "unexpected: conv_blocks_context.2.1.conv1.weight" in msg
    assert "mis-shaped: upsample_layers.0.conv.weight" in msg
    assert "conv_blocks_localization.{0-4}" in msg and str(TINY_DIMS) in msg  # the expected layout


def test_wrong_variant_is_named_in_the_hint(tmp_path: Path) -> None:
    path = _save({"state_dict": synthetic_state(1, 105, dims=(8, 16, 32, 64, 128, 128))}, tmp_path / "other.model")
    with pytest.raises(WeightsError, match=r"checkpoint has dims \(8, 16, 32, 64, 128, 128\)"):
        load_stunet_checkpoint(tiny(), path)


def test_unreadable_or_unsafe_files(tmp_path: Path) -> None:
    model = tiny()
    with pytest.raises(WeightsError, match="does not exist"):
        load_stunet_checkpoint(model, tmp_path / "nope.pth")
    good = _save(synthetic_state(1, 3), tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="sha256"):
        load_stunet_checkpoint(model, good, sha256="0" * 64)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_stunet_checkpoint(model, tmp_path / "junk.pt")
    unsafe = _save({"state_dict": synthetic_state(1, 3), "where": pathlib.PurePosixPath("/x")}, tmp_path / "u.pt")
    with pytest.raises(WeightsError, match="weights-only"):
        load_stunet_checkpoint(model, unsafe)
    with pytest.raises(WeightsError, match="holds no STU-Net state dict"):
        load_stunet_checkpoint(model, _save({"epoch": 3, "lr": 0.01}, tmp_path / "meta.pt"))
