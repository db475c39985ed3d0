"""SegFormer3D specifics: paper size, per-axis token grids, decoder shape, configuration errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medseg.core.config import load_config
from medseg.core.errors import ConfigError
from medseg.models import count_parameters, create_model, get_card
from medseg.models.segformer3d import SegFormer3D, _EfficientSelfAttention, _to_tokens, _to_volume

PAPER_PARAMS = 4.51e6
OFFICIAL_PARAMS = 4_525_251  # the official current code, measured (docs/models/segformer3d.md)
TINY = {"embed_dims": (8, 16, 24, 32), "num_heads": (1, 1, 1, 2), "depths": (1, 1, 1, 1), "decoder_dim": 16}
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def paper_model() -> SegFormer3D:
    torch.manual_seed(0)
    return SegFormer3D(in_channels=4, out_channels=3).eval()


def test_paper_config_parameter_count(paper_model: SegFormer3D) -> None:
    n = count_parameters(paper_model)
    assert n == OFFICIAL_PARAMS == get_card("segformer3d").reference_params
    # the paper's 4.51 M is an older revision of the official code (4,511,939 by its profiler notebook)
    assert round(n / 1e4) == 453 and round(PAPER_PARAMS / 1e4) == 451


def test_builds_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = create_model("segformer3d")
        dropped = create_model("segformer3d", drop_path_rate=0.1)
    assert count_parameters(model) == count_parameters(dropped) == OFFICIAL_PARAMS
    assert next(model.parameters()).is_meta
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in dropped.stages for b in stage.blocks]
    assert rates == pytest.approx([0.1 * i / 7 for i in range(8)])  # linear over the 8 blocks, the first 0


def test_output_convention_is_explicit() -> None:
    assert get_card("segformer3d").output == "softmax"
    assert SegFormer3D(in_channels=1, out_channels=2, **TINY).output == "softmax"


def test_brats_config_loads_and_reproduces_the_paper_recipe() -> None:
    cfg = load_config(CONFIGS / "segformer3d_brats.yaml")
    assert cfg.model.name == "segformer3d" and cfg.model.roi_size == (128, 128, 128)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.batch_size, t.epochs, t.seed, t.grad_clip) == (1e-4, 0.01, 2, 800, 42, None)
    assert t.warmup_iters == 20 * t.iters_per_epoch  # 20 epochs of linear warm-up
    assert t.lr * t.min_lr_ratio == pytest.approx(6e-6)  # eta_min
    assert t.loss == "dice_ce" and cfg.data.preset == "mri"
    assert (cfg.infer.sw_batch_size, cfg.infer.blend) == (4, "constant")
    text = (CONFIGS / "segformer3d_brats.yaml").read_text()
    assert "WT = 1|2|3" in text and "TC = 2|3" in text and "ET = 3" in text


def test_registry_default_is_paper_config() -> None:
    model = create_model("segformer3d")
    assert count_parameters(model) == OFFICIAL_PARAMS
    assert model.card.reference_config["embed_dims"] == (32, 64, 160, 256)


def test_non_cubic_input_and_stage_grids(paper_model: SegFormer3D) -> None:
    x = torch.randn(1, 4, 64, 96, 128)
    with torch.no_grad():
        feats = paper_model.forward_features(x)
        out = paper_model(x)
    expected = [(1, 32, 16, 24, 32), (1, 64, 8, 12, 16), (1, 160, 4, 6, 8), (1, 256, 2, 3, 4)]
    assert [tuple(f.shape) for f in feats] == expected
    assert out.shape == (1, 3, 64, 96, 128)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        dec = paper_model.decoder(feats)
    assert dec.shape == (1, 3, 16, 24, 32)  # stage-1 grid, before the x4 upsampling


def test_token_grid_layout_is_per_axis() -> None:
    vol = torch.arange(2 * 3 * 2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 2, 3, 4)
    tokens = _to_tokens(vol)
    assert tokens.shape == (2, 24, 3)
    torch.testing.assert_close(_to_volume(tokens, (2, 3, 4)), vol)
    # token n sits at (d, h, w) = unravel(n, (2, 3, 4)): token 7 is (0, 1, 3)
    torch.testing.assert_close(tokens[:, 7], vol[:, :, 0, 1, 3])


def test_attention_spatial_reduction_matches_manual_softmax() -> None:
    torch.manual_seed(0)
    attn = _EfficientSelfAttention(dim=8, num_heads=2, sr_ratio=2).eval()
    grid = (4, 2, 6)
    x = torch.randn(1, 48, 8)
    with torch.no_grad():
        out = attn(x, grid)
        kv_src = attn.sr_norm(_to_tokens(attn.sr(_to_volume(x, grid))))
        assert kv_src.shape == (1, 6, 8)  # (4 / 2) * (2 / 2) * (6 / 2) reduced tokens
        q = attn.q(x).reshape(1, 48, 2, 4).transpose(1, 2)
        k, v = attn.kv(kv_src).reshape(1, 6, 2, 2, 4).permute(2, 0, 3, 1, 4)
        weights = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)
        ref = attn.proj((weights @ v).transpose(1, 2).reshape(1, 48, 8))
    torch.testing.assert_close(out, ref)


def test_drop_path_trains_and_is_off_in_eval() -> None:
    torch.manual_seed(0)
    model = SegFormer3D(1, 2, embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 2), depths=(1, 1, 1, 1), decoder_dim=16,
                        drop_path_rate=0.2)  # fmt: skip
    x = torch.randn(2, 1, 32, 32, 64)
    model.train()(x).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x))


@pytest.mark.parametrize(
    "kwargs",
    [{"embed_dims": (8, 16, 24)}, {"num_heads": (1, 2, 4, 3)}, {"depths": (1, 0, 1, 1)}, {"drop_path_rate": 1.5}],
)
def test_bad_configuration_raises_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="segformer3d"):
        create_model("segformer3d", **kwargs)
