"""MPU-Net (re-implemented from the abstract): size, PAM and windowed cross-attention maths, deep supervision, loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss

from medseg.core.errors import ConfigError, ModelInputError
from medseg.models import count_parameters, create_model, get_card, tiny_overrides
from medseg.models.mpunet import MPUNet, _from_windows, _SerialisedPAM, _to_windows, _WindowCrossAttention
from medseg.training.losses import LOSSES, DeepSupervisionLoss, build_loss, dice_ce
from medseg.training.losses.mpunet import MPUNetHybridLoss

FULL_PARAMS = 17_627_317


def _tiny(**extra: object) -> MPUNet:
    torch.manual_seed(0)
    return create_model("mpunet", **{**tiny_overrides("mpunet"), **extra})


def test_full_config_parameter_count_and_card() -> None:
    card = get_card("mpunet")
    model = create_model("mpunet")
    assert count_parameters(model) == FULL_PARAMS == card.reference_params
    assert card.divisible_by == (16, 16, 16) and card.roi_size == (128, 128, 128)
    assert card.label_names == ("background", "liver", "tumour") and card.intensity_preset == "ct"
    assert "2307.05799" in card.paper and "abstract" in card.paper
    assert model.card.divisible_by == (16, 16, 16)


def test_tiny_forward_backward_deep_supervision_list_in_training_only() -> None:
    model = _tiny().train()
    # gamma starts at 0, so the PAM projections would get zero (not missing) gradients; open it to check the wiring
    with torch.no_grad():
        model.bottleneck_attention.gamma.fill_(0.5)
    x = torch.randn(2, 1, 32, 32, 32)
    outs = model(x)
    assert isinstance(outs, list) and len(outs) == 4  # main + 3 auxiliary heads
    assert all(o.shape == (2, 3, 32, 32, 32) and torch.isfinite(o).all() for o in outs)
    MPUNetHybridLoss()(outs, torch.randint(0, 3, (2, 1, 32, 32, 32))).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, dead
    with torch.no_grad():
        y = model.eval()(x)
    assert isinstance(y, torch.Tensor) and y.shape == (2, 3, 32, 32, 32)


def test_without_deep_supervision_returns_a_tensor_and_has_one_head() -> None:
    model = _tiny(deep_supervision=False).train()
    assert len(model.heads) == 1
    assert isinstance(model(torch.randn(1, 1, 16, 16, 32)), torch.Tensor)


def test_any_divisible_non_cubic_input_and_position_embedding_resize() -> None:
    model = _tiny().eval()  # position embedding grid (2, 2, 2); this bottleneck is (1, 3, 2)
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 48, 32))
    assert y.shape == (1, 3, 16, 48, 32) and torch.isfinite(y).all()


def test_input_errors() -> None:
    model = _tiny().eval()
    with pytest.raises(ModelInputError, match="single bottleneck voxel"):
        model(torch.randn(1, 1, 16, 16, 16))
    with pytest.raises(ModelInputError, match="divisible by 16"):
        model(torch.randn(1, 1, 16, 16, 24))


@pytest.mark.parametrize(
    "kwargs",
    [{"filters": (8, 16)}, {"filters": (8, 8, 8, 4)}, {"deep_supr_num": 4}, {"window": 0}, {"dilations": ()}],
)
def test_config_errors(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="mpunet"):
        create_model("mpunet", **{**tiny_overrides("mpunet"), **kwargs})


def test_pam_is_danet_position_attention_over_serialised_tokens() -> None:
    torch.manual_seed(0)
    pam = _SerialisedPAM(16, (2, 3, 2)).eval()
    with torch.no_grad():
        pam.gamma.fill_(0.7)
    x = torch.randn(2, 16, 2, 3, 2)
    with torch.no_grad():
        out = pam(x)
        tokens = (x + pam.pos_embed).flatten(2)  # (B, C, N)
        # the 1x1 convolutions of DANet on the serialised sequence (B, C, N)
        q = F.conv1d(tokens, pam.query.weight[:, :, None], pam.query.bias)  # (B, C/8, N)
        k = F.conv1d(tokens, pam.key.weight[:, :, None])
        v = F.conv1d(tokens, pam.value.weight[:, :, None], pam.value.bias)
        attention = torch.softmax(torch.bmm(q.transpose(1, 2), k), dim=-1)  # (B, N, N), unscaled, over positions
        expected = (0.7 * torch.bmm(v, attention.transpose(1, 2)) + tokens).reshape(x.shape)
    assert pam.query.out_features == 2 and pam.value.out_features == 16
    torch.testing.assert_close(out, expected)
    with torch.no_grad():  # gamma = 0 at init: the block only adds the position embedding
        pam.gamma.zero_()
        torch.testing.assert_close(pam(x), x + pam.pos_embed)


def test_windows_round_trip_and_layout() -> None:
    x = torch.arange(2 * 3 * 4 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 4, 6)
    t = _to_windows(x, (2, 2, 3))
    assert t.shape == (2 * 2 * 2 * 2, 12, 3)
    torch.testing.assert_close(_from_windows(t, (2, 2, 3), x.shape), x)
    # second window of batch 0 is d 0:2, h 0:2, w 3:6
    torch.testing.assert_close(t[1], x[0, :, 0:2, 0:2, 3:6].flatten(1).T)


def _manual_cross_attention(att: _WindowCrossAttention, dec: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """Plain multi-head cross-attention over the whole grid (queries from ``dec``, keys / values from ``skip``)."""
    b, c = dec.shape[:2]
    h, hd = att.heads, c // att.heads
    q = att.q(att.norm_q(dec.flatten(2).transpose(1, 2))).reshape(b, -1, h, hd).transpose(1, 2)
    kv = att.kv(att.norm_kv(skip.flatten(2).transpose(1, 2))).reshape(b, -1, 2, h, hd)
    k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    out = (p @ v).transpose(1, 2).reshape(b, -1, c)
    return dec + att.proj(out).transpose(1, 2).reshape(dec.shape)


def test_cross_attention_is_decoder_query_skip_key_value_inside_windows() -> None:
    torch.manual_seed(0)
    att = _WindowCrossAttention(64, window=4, kv_pool=1).eval()
    assert att.heads == 2
    dec, skip = torch.randn(1, 64, 4, 4, 4), torch.randn(1, 64, 4, 4, 4)
    with torch.no_grad():  # one window covers the grid: identical to full cross-attention
        torch.testing.assert_close(att(dec, skip), _manual_cross_attention(att, dec, skip), rtol=1e-4, atol=1e-5)
        # pooled keys: each query sees the window's skip average-pooled 2x
        pooled = _WindowCrossAttention(64, window=4, kv_pool=2).eval()
        pooled.load_state_dict(att.state_dict())
        expected = _manual_cross_attention(att, dec, F.avg_pool3d(skip, 2))
        torch.testing.assert_close(pooled(dec, skip), expected, rtol=1e-4, atol=1e-5)


def test_cross_attention_is_local_to_its_window_and_handles_odd_axes() -> None:
    torch.manual_seed(0)
    att = _WindowCrossAttention(8, window=4, kv_pool=2).eval()
    dec, skip = torch.randn(1, 8, 2, 8, 6), torch.randn(1, 8, 2, 8, 6)  # windows (2, 4, 2), keys pooled (1, 2, 1)
    with torch.no_grad():
        base = att(dec, skip)
        changed = skip.clone()
        changed[..., 4:, :2] += 5.0  # inside the window h 4:8, w 0:2 only
        diff = (att(dec, changed) - base).abs().amax(dim=1)[0]
    assert diff[:, 4:, :2].min() > 0
    assert diff[:, :4].max() == 0 and diff[:, :, 2:].max() == 0


@pytest.mark.parametrize(
    ("grid", "window", "pool"),
    [
        ((2, 6, 6), (2, 2, 2), (1, 1, 1)),  # coarsest level of a (16, 48, 48) input: keys stay unpooled
        ((4, 4, 8), (4, 4, 8), (2, 2, 2)),  # coarsest level of (32, 32, 64): 2 keys per axis after pooling
        ((16, 12, 8), (8, 4, 8), (2, 2, 2)),
    ],
)
def test_cross_attention_windowing_never_leaves_a_single_key(grid: tuple, window: tuple, pool: tuple) -> None:
    att = _WindowCrossAttention(8, window=8, kv_pool=2)
    got_window, got_pool = att.windowing(grid)
    assert (got_window, got_pool) == (window, pool)
    assert all(w // p >= 2 for w, p in zip(got_window, got_pool, strict=True))


def test_coarsest_cross_attention_of_a_16_times_odd_input_attends_to_several_keys() -> None:
    """With one key per window every query of the window would receive the same update (softmax over one key = 1)."""
    torch.manual_seed(0)
    model = _tiny().eval()  # tiny: window 4, kv_pool 2; coarsest decoder level of (16, 48, 48) is (2, 6, 6)
    coarsest = model.decoder[-1].cross
    seen: list[torch.Tensor] = []
    hook = coarsest.register_forward_hook(lambda m, args, out: seen.append((out - args[0]).detach()))
    with torch.no_grad():
        y = model(torch.randn(1, 1, 16, 48, 48))
    hook.remove()
    assert y.shape == (1, 3, 16, 48, 48) and torch.isfinite(y).all()
    update = seen[0]  # (1, C, 2, 6, 6); windows are 2 x 2 x 2
    assert update.shape[2:] == (2, 6, 6)
    first_window = update[0, :, 0:2, 0:2, 0:2].flatten(1)
    assert (first_window - first_window[:, :1]).abs().max() > 1e-6  # queries differ: more than one key


def test_hybrid_loss_is_registered_and_weights_are_documented() -> None:
    assert MPUNet.paper_loss == "mpunet_hybrid"  # the trainer's default loss for MPU-Net: its own weights
    assert "mpunet_hybrid" in LOSSES
    loss = LOSSES.get("mpunet_hybrid")()
    assert isinstance(loss, MPUNetHybridLoss) and loss.handles_deep_supervision
    assert loss.weights(4) == [1.0, 0.5, 0.25, 0.125]
    assert loss.weights(6) == [1.0, 0.5, 0.25, 0.125, 0.0625, 0.03125]
    assert loss.weights(1) == [1.0]
    with pytest.raises(ConfigError):
        MPUNetHybridLoss(aux_weights=())


def test_hybrid_loss_value_against_manual_dice_ce() -> None:
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8))
    outs = [torch.randn(2, 3, 8, 8, 8) for _ in range(4)]
    base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    expected = sum(w * base(o, target) for w, o in zip((1, 0.5, 0.25, 0.125), outs, strict=True)) / 1.875
    loss = MPUNetHybridLoss()
    torch.testing.assert_close(loss(outs, target), expected)
    torch.testing.assert_close(loss(outs[0], target), base(outs[0], target))
    # MPU-Net's own weights, not nnU-Net's (which give the coarsest output weight 0)
    nnunet_rule = DeepSupervisionLoss(dice_ce())(outs, target)
    assert not torch.allclose(nnunet_rule, expected)
    torch.testing.assert_close(build_loss("mpunet_hybrid")(outs, target), expected)


def test_hybrid_loss_upsamples_small_outputs_to_the_full_resolution_target() -> None:
    torch.manual_seed(0)
    target = torch.zeros(1, 1, 8, 8, 8, dtype=torch.long)
    target[..., 3, 3, 3] = 2  # a one-voxel "tumour" that nearest downsampling by 2 would drop
    small = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    up = F.interpolate(small, size=(8, 8, 8), mode="trilinear", align_corners=False)
    base = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
    torch.testing.assert_close(MPUNetHybridLoss()(small, target), base(up, target))
    MPUNetHybridLoss()([torch.randn(1, 3, 8, 8, 8), small], target).backward()
    assert small.grad is not None and small.grad.abs().sum() > 0


def test_tiny_model_fits_one_volume_with_the_hybrid_loss() -> None:
    torch.manual_seed(0)
    model = _tiny().train()
    x = torch.randn(1, 1, 16, 16, 32)
    target = (x > 0.5).long() + (x > 1.5).long()  # learnable from the intensity alone
    loss_fn = MPUNetHybridLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
