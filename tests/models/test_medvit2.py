"""MedViTV2 specifics: neighbourhood attention, released sizes and key layout, weight loading, forward contracts."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from skimage.filters import threshold_otsu
from torch.utils._python_dispatch import TorchDispatchMode

from medseg.core.errors import ConfigError, ModelInputError, WeightsError
from medseg.models import ModelCard, count_parameters, create_model, get_card
from medseg.models.layers.neighborhood_attention import (
    NeighborhoodAttention2D,
    neighborhood_attention_2d,
    neighborhood_indices,
)
from medseg.models.medvit2 import (
    GFP,
    LFP,
    MEDVIT2_VARIANTS,
    TINY,
    MedViT,
    MedViTConfig,
    load_medvit2_weights,
    min_input_size,
)
from medseg.models.medvit2_seg import MedViTSeg

VARIANTS = ("tiny", "small", "base", "large")
# Released sizes at 1000 classes in millions (docs/models/medvit2.md, measured on the official modules).
PUBLISHED_MILLIONS = {"tiny": 11.72, "small": 30.09, "base": 67.00, "large": 118.29}
TINY_CONFIG = MedViTConfig(**TINY, num_classes=3)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny networks gain nothing from a second thread, and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- neighbourhood attention ----------------------------------------------------------------------------------------


def _window_start(i: int, length: int, k: int) -> int:
    """NATTEN's rule, written out: centre the window on i, then shift it inward at the borders."""
    start = i - k // 2
    if start < 0:
        return 0
    if start + k > length:
        return length - k
    return start


def _reference_na(module: NeighborhoodAttention2D, x: torch.Tensor) -> torch.Tensor:
    """Full attention over all H*W tokens with an explicit neighbourhood mask and bias, built query by query."""
    b, h, w, c = x.shape
    heads, d, k = module.num_heads, module.head_dim, module.kernel_size
    q, key, v = module.qkv(x).reshape(b, h * w, 3, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, N, d) each
    logits = (q * d**-0.5) @ key.transpose(-1, -2)  # (B, heads, N, N)
    bias = torch.full((heads, h * w, h * w), float("-inf"))
    for i, j in itertools.product(range(h), range(w)):
        r0, c0 = _window_start(i, h, k), _window_start(j, w, k)
        for r, col in itertools.product(range(r0, r0 + k), range(c0, c0 + k)):
            bias[:, i * w + j, r * w + col] = module.rpb[:, r - i + k - 1, col - j + k - 1]
    out = (logits + bias).softmax(-1) @ v  # (B, heads, N, d)
    return module.proj(out.permute(0, 2, 1, 3).reshape(b, h, w, c))


@pytest.mark.parametrize(("h", "w", "k"), [(9, 13, 7), (14, 14, 7), (7, 7, 7), (8, 11, 5), (5, 6, 3)])
def test_neighbourhood_attention_matches_masked_full_attention(h: int, w: int, k: int) -> None:
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(16, num_heads=2, kernel_size=k).eval()
    with torch.no_grad():
        module.rpb.normal_(0.0, 1.0)  # large, distinct biases: a wrong lookup cannot hide
        x = torch.randn(2, h, w, 16)
        torch.testing.assert_close(module(x), _reference_na(module, x), atol=1e-5, rtol=1e-5)


def test_neighbourhood_windows_shift_inward_at_the_borders() -> None:
    positions, bias_index = neighborhood_indices(9, 7)
    assert positions[:, 0].tolist() == [0, 0, 0, 0, 1, 2, 2, 2, 2]
    assert positions[0].tolist() == list(range(7)) and positions[8].tolist() == list(range(2, 9))
    assert bias_index[0].tolist() == list(range(6, 13))  # offsets 0..6 from the first row
    assert bias_index[4].tolist() == list(range(3, 10))  # centred: offsets -3..3
    assert bias_index[8].tolist() == list(range(0, 7))  # offsets -6..0 from the last row


def test_neighbourhood_attention_refuses_maps_smaller_than_the_kernel() -> None:
    with pytest.raises(ModelInputError, match="6x9 feature map is smaller than the 7x7 kernel"):
        NeighborhoodAttention2D(16, num_heads=2, kernel_size=7)(torch.randn(1, 6, 9, 16))


@pytest.mark.parametrize(("h", "w", "k"), [(9, 13, 7), (20, 17, 7), (8, 11, 5)])
def test_neighbourhood_attention_gradients_match_masked_full_attention(h: int, w: int, k: int) -> None:
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(16, num_heads=2, kernel_size=k)
    with torch.no_grad():
        module.rpb.normal_(0.0, 1.0)
    x = torch.randn(2, h, w, 16, requires_grad=True)
    weight = torch.randn(2, h, w, 16)
    grads = []
    for forward in (module, lambda t: _reference_na(module, t)):
        module.zero_grad()
        x.grad = None
        (forward(x) * weight).sum().backward()
        grads.append([x.grad.clone(), module.qkv.weight.grad.clone(), module.rpb.grad.clone()])
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operator returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_neighbourhood_attention_does_not_copy_keys_per_neighbour() -> None:
    """No intermediate grows with k * k copies of the keys (49x at k = 7): tiles read a 13 x 13 strip per 7 x 7."""
    q, k, v = (torch.randn(2, 2, 28, 28, 32) for _ in range(3))
    with torch.no_grad(), _LargestTensor() as mode:
        neighborhood_attention_2d(q, k, v, torch.zeros(2, 13, 13), 7)
    assert mode.largest <= 8 * q.numel()


def test_neighbourhood_attention_batch_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    module = NeighborhoodAttention2D(64, num_heads=2, kernel_size=7).eval()
    x = torch.randn(4, 14, 21, 64)
    with torch.no_grad():
        want = _reference_na(module, x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = module(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
        torch.testing.assert_close(module(x[2:3]), want[2:3], atol=1e-5, rtol=1e-5)


# -- sizes and key layout of the released variants -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_released_parameter_counts(variant: str) -> None:
    with torch.device("meta"):
        model = create_model(f"medvit2_{variant}", out_channels=1000)
        seg = create_model(f"medvit2_seg_{variant}")
    n = count_parameters(model)
    assert n == get_card(f"medvit2_{variant}").reference_params
    assert round(n / 1e4) == round(PUBLISHED_MILLIONS[variant] * 100)  # same to 0.01 M
    assert count_parameters(seg) == get_card(f"medvit2_seg_{variant}").reference_params


def _bn(prefix: str, c: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.{n}": (c,) for n in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def _patch_embed(prefix: str, cin: int, cout: int, stride: int) -> dict[str, tuple[int, ...]]:
    if stride == 1 and cin == cout:
        return {}
    return {f"{prefix}.conv.weight": (cout, cin, 1, 1)} | _bn(f"{prefix}.norm", cout)


def _lff(prefix: str, c: int, expand: int, k: int) -> dict[str, tuple[int, ...]]:
    hid = c * expand
    return (
        {f"{prefix}.conv.0.weight": (hid, c, 1, 1), f"{prefix}.conv.3.weight": (hid, 1, k, k)}
        | _bn(f"{prefix}.conv.1", hid)
        | _bn(f"{prefix}.conv.4", hid)
        | {f"{prefix}.conv.6.fc.0.weight": (expand, hid), f"{prefix}.conv.6.fc.0.bias": (expand,)}
        | {f"{prefix}.conv.6.fc.2.weight": (hid, expand), f"{prefix}.conv.6.fc.2.bias": (hid,)}
        | {f"{prefix}.conv.7.weight": (c, hid, 1, 1)}
        | _bn(f"{prefix}.conv.8", c)
    )


def official_layout(depths: tuple[int, ...], dims: tuple[int, ...], classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the official MedViT state dict, written from the released rules (docs/models/medvit2.md)."""
    layout: dict[str, tuple[int, ...]] = {}
    for i, (cin, cout) in enumerate([(3, 64), (64, 32), (32, 64), (64, 64)]):
        layout |= {f"stem.{i}.conv.weight": (cout, cin, 3, 3)} | _bn(f"stem.{i}.norm", cout)
    types = [["L"] * depths[0], ["L"] * (depths[1] - 1) + ["G"], ["L", "L", "G"] * (depths[2] // 3), ["G"] * depths[3]]
    idx, cin = 0, 64
    for stage, kinds in enumerate(types):
        c = dims[stage]
        for b, kind in enumerate(kinds):
            p = f"features.{idx}"
            stride = 2 if stage and b == 0 else 1
            if kind == "L":
                layout |= _patch_embed(f"{p}.patch_embed", cin, c, stride) | _bn(f"{p}.norm1", c)
                layout |= {f"{p}.attn.qkv.weight": (3 * c, c), f"{p}.attn.qkv.bias": (3 * c,)}
                layout |= {
                    f"{p}.attn.rpb": (c // 32, 13, 13),
                    f"{p}.attn.proj.weight": (c, c),
                    f"{p}.attn.proj.bias": (c,),
                }
                layout |= _lff(f"{p}.conv", c, 3, 7 if stage == 0 else 3) | _bn(f"{p}.norm2", c)
            else:
                c_sa = {128: 96, 192: 160, 256: 192, 384: 288, 512: 384, 768: 576, 1024: 768}[c]  # make_divisible(.75c)
                c_ca = c - c_sa
                layout |= _patch_embed(f"{p}.patch_embed", cin, c_sa, stride) | _bn(f"{p}.norm1", c_sa)
                for n in ("q", "k", "v", "proj"):
                    layout |= {f"{p}.e_mhsa.{n}.weight": (c_sa, c_sa), f"{p}.e_mhsa.{n}.bias": (c_sa,)}
                if stage < 3:  # sr ratios 8 / 4 / 2 / 1: pooled keys need their BatchNorm1d
                    layout |= _bn(f"{p}.e_mhsa.norm", c_sa)
                layout |= _patch_embed(f"{p}.projection", c_sa, c_ca, 1)
                layout |= {
                    f"{p}.mhca.group_conv3x3.weight": (c_ca, 32, 3, 3),
                    f"{p}.mhca.projection.weight": (c_ca, c_ca, 1, 1),
                }
                layout |= _bn(f"{p}.mhca.norm", c_ca) | _bn(f"{p}.norm2", c)
                layout |= _lff(f"{p}.conv", c, 2, 3)  # built, never called, present in the checkpoints
                for j, (a, z) in enumerate([(c, 2 * c), (2 * c, c)]):
                    q = f"{p}.kan.layers.{j}"
                    layout |= {f"{q}.layernorm.weight": (a,), f"{q}.layernorm.bias": (a,), f"{q}.rbf.grid": (8,)}
                    layout |= {f"{q}.spline_linear.weight": (z, 8 * a)}
            idx, cin = idx + 1, c
    return layout | _bn("norm", cin) | {"proj_head.0.weight": (classes, cin), "proj_head.0.bias": (classes,)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_layout_is_the_official_one(variant: str) -> None:
    with torch.device("meta"):
        model = create_model(f"medvit2_{variant}", out_channels=1000)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = MEDVIT2_VARIANTS[variant]
    expected = official_layout(cfg["depths"], cfg["dims"])
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected


def test_unused_locality_feed_forward_of_gfp_is_kept_frozen() -> None:
    model = MedViT(TINY_CONFIG).train()
    gfps = [m for m in model.modules() if isinstance(m, GFP)]
    assert gfps and all(not p.requires_grad for g in gfps for p in g.conv.parameters())
    model(torch.randn(2, 3, 128, 128)).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert no_grad == []
    assert all(p.grad is None for g in gfps for p in g.conv.parameters())


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    config = dataclasses.replace(TINY_CONFIG, drop_path_rate=0.0)  # no random paths: both runs compute the same
    plain = MedViT(config).train()
    ckpt = MedViT(dataclasses.replace(config, grad_checkpointing=True)).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    ckpt.features[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 128, 128)
    plain(x).square().sum().backward()
    ckpt(x).square().sum().backward()
    assert len(calls) == 2  # the block ran again in the backward pass
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_raw_reshapes_of_the_released_forward() -> None:
    """LFP feeds NA ``x.reshape(B, H, W, C)`` of the NCHW map and GFP feeds the KAN ``x.reshape(-1, C)``."""
    torch.manual_seed(0)
    model = MedViT(TINY_CONFIG).eval()
    lfp = next(m for m in model.modules() if isinstance(m, LFP))
    gfp = next(m for m in model.modules() if isinstance(m, GFP) and isinstance(m.patch_embed.conv, torch.nn.Conv2d))
    with torch.no_grad():
        x = torch.randn(2, 16, 8, 12)
        b, c, h, w = x.shape
        y = lfp.patch_embed(x)
        raw = lfp.attn(lfp.norm1(y).reshape(b, h, w, c)).reshape(b, c, h, w)
        permuted = lfp.attn(lfp.norm1(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        assert not torch.allclose(raw, permuted, atol=1e-3)  # the two layouts really differ
        torch.testing.assert_close(lfp(x), y + raw + lfp.conv(lfp.norm2(y + raw)))

        cin = gfp.patch_embed.conv.in_channels
        z = torch.randn(2, cin, 8, 8)
        out = gfp(z)
        xs = gfp.patch_embed(z)
        bb, cc, hh, ww = xs.shape
        xs = xs + gfp.e_mhsa(gfp.norm1(xs).flatten(2).transpose(1, 2)).transpose(1, 2).reshape(bb, cc, hh, ww)
        ca = gfp.projection(xs)
        xs = torch.cat([xs, ca + gfp.mhca(ca)], 1)
        d = xs.shape[1]
        torch.testing.assert_close(out, xs + gfp.kan(gfp.norm2(xs).reshape(-1, d)).reshape(bb, d, hh, ww))


# -- configuration and input contract --------------------------------------------------------------------------------


def test_minimum_input_size_follows_the_neighbourhood_kernel() -> None:
    assert min_input_size(MedViTConfig()) == 128  # 7 x stride 16 = 112 -> next multiple of 32
    assert min_input_size(MedViTConfig(na_kernel=3)) == 64  # 3 x 16 = 48 -> 64
    for variant in VARIANTS:
        assert get_card(f"medvit2_{variant}").min_size == (128, 128)
        assert get_card(f"medvit2_seg_{variant}").min_size == (128, 128)
    model = MedViT(TINY_CONFIG).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 128, 160)).shape == (1, 3)
        with pytest.raises(ModelInputError, match="96x128 is smaller than the network's minimum 128x128"):
            model(torch.randn(1, 3, 96, 128))
        with pytest.raises(ModelInputError, match="not divisible by 32"):
            model(torch.randn(1, 3, 130, 128))


def test_card_fields() -> None:
    card = get_card("medvit2_tiny")
    assert (card.task, card.spatial_dims, card.in_channels, card.roi_size, card.divisible_by) == (
        "classification",
        2,
        3,
        (224, 224),
        (32, 32),
    )
    assert card.intensity_preset == "rgb_mean05_std05" and card.target_spacing is None
    assert card.reference_config == {"out_channels": 1000} and "2502.13693" in card.paper
    seg = get_card("medvit2_seg_tiny")
    assert (seg.task, seg.label_names, seg.output) == ("segmentation", ("background", "foreground"), "softmax")
    assert "not from the paper" in seg.paper
    assert ModelCard.from_dict(seg.to_dict()) == seg


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ConfigError, match="multiple of 3"):
        MedViT(MedViTConfig(depths=(2, 2, 4, 2)))
    with pytest.raises(ConfigError, match="multiple of head_dim"):
        MedViT(MedViTConfig(dims=(64, 128, 250, 512)))
    with pytest.raises(ConfigError, match="does not accept|unknown MedViTV2 options"):
        create_model("medvit2_tiny", dimz=(1, 2, 3, 4))


def test_released_tiny_forward_at_224() -> None:
    torch.manual_seed(0)
    model = create_model("medvit2_tiny", out_channels=7).eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 224, 224))
    assert y.shape == (1, 7) and torch.isfinite(y).all()


def test_segmentation_forward_and_stage_maps() -> None:
    torch.manual_seed(0)
    model = create_model("medvit2_seg_tiny", **TINY, decoder_dim=16, out_channels=4).eval()
    x = torch.randn(2, 3, 128, 192)
    with torch.no_grad():
        feats = model.encoder.forward_features(x)
        assert [tuple(f.shape) for f in feats] == [
            (2, c, 128 // s, 192 // s) for c, s in zip(TINY["dims"], (4, 8, 16, 32), strict=True)
        ]
        assert model(x).shape == (2, 4, 128, 192)
        with pytest.raises(ModelInputError, match="medvit2_seg_tiny: input 64x192"):
            model(torch.randn(1, 3, 64, 192))


# -- weights ----------------------------------------------------------------------------------------------------------


def _save(state: dict[str, torch.Tensor], path: Path, container: str | None = None) -> Path:
    torch.save({container: state} if container else state, path)
    return path


def test_loader_drops_a_classifier_of_another_class_count(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MedViT(MedViTConfig(**TINY, num_classes=10))
    target = MedViT(TINY_CONFIG)
    head_before = target.proj_head[0].weight.detach().clone()
    path = _save(source.state_dict(), tmp_path / "medvit.pth", container="model")  # the official training layout
    dropped = load_medvit2_weights(target, path)
    assert dropped == ["proj_head.0.weight", "proj_head.0.bias"]
    torch.testing.assert_close(target.proj_head[0].weight, head_before)
    src = source.state_dict()
    for k, v in target.state_dict().items():
        if not k.startswith("proj_head."):
            torch.testing.assert_close(v, src[k])
    same = MedViT(MedViTConfig(**TINY, num_classes=10))
    assert load_medvit2_weights(same, path) == []
    torch.testing.assert_close(same.proj_head[0].weight, source.proj_head[0].weight)


def test_loader_refuses_other_mismatches_naming_the_keys(tmp_path: Path) -> None:
    state = MedViT(TINY_CONFIG).state_dict()
    renamed = dict(state)
    renamed["features.0.attn.rpb_table"] = renamed.pop("features.0.attn.rpb")
    with pytest.raises(WeightsError, match="missing: features.0.attn.rpb.*unexpected: features.0.attn.rpb_table"):
        load_medvit2_weights(MedViT(TINY_CONFIG), _save(renamed, tmp_path / "renamed.pth"))
    shaped = dict(state)
    shaped["stem.0.conv.weight"] = torch.zeros(16, 1, 3, 3)
    with pytest.raises(WeightsError, match=r"mis-shaped: stem.0.conv.weight \(16, 1, 3, 3\)"):
        load_medvit2_weights(MedViT(TINY_CONFIG), _save(shaped, tmp_path / "shaped.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        load_medvit2_weights(MedViT(TINY_CONFIG), tmp_path / "absent.pth")
    with pytest.raises(WeightsError, match="got a Linear"):
        load_medvit2_weights(torch.nn.Linear(2, 2), tmp_path / "renamed.pth")


def test_segmentation_encoder_loads_a_classification_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = MedViT(MedViTConfig(**TINY, num_classes=1000))
    seg = MedViTSeg(MedViTConfig(**TINY), out_channels=2, decoder_dim=16)
    assert load_medvit2_weights(seg, _save(source.state_dict(), tmp_path / "c.pth")) == [
        "proj_head.0.weight",
        "proj_head.0.bias",
    ]
    src = source.state_dict()
    for k, v in seg.encoder.state_dict().items():
        torch.testing.assert_close(v, src[k])


# -- learning on real pixels --------------------------------------------------------------------------------------


def _astronaut_tiles(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four RGB tiles of the astronaut photograph, normalised (x / 255 - 0.5) / 0.5, and an Otsu foreground label."""
    img = skimage.data.astronaut()  # (512, 512, 3) uint8
    gray = img.mean(-1)
    label = gray > threshold_otsu(gray)
    step = 256 // size
    tiles = [(0, 0), (0, 256), (256, 128), (128, 256)]
    x = np.stack([img[r : r + 256 : step, c : c + 256 : step] for r, c in tiles]).astype(np.float32)
    y = np.stack([label[r : r + 256 : step, c : c + 256 : step] for r, c in tiles]).astype(np.int64)
    x = (torch.from_numpy(x).permute(0, 3, 1, 2) / 255.0 - 0.5) / 0.5
    return x, torch.from_numpy(y)


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 20) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_segmentation_learns_a_real_image() -> None:
    torch.manual_seed(0)
    x, y = _astronaut_tiles(128)  # the released 7x7 kernel at its minimum input
    model = create_model("medvit2_seg_tiny", **TINY, decoder_dim=16)
    losses = _train(model, x, y)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses


def test_classification_learns_a_real_image() -> None:
    torch.manual_seed(0)
    x = _astronaut_tiles(128)[0][:2]
    x = torch.cat([x, x.flip(-2)])  # class 1: the same tiles upside down
    y = torch.tensor([0, 0, 1, 1])
    losses = _train(create_model("medvit2_tiny", **TINY, out_channels=2), x, y)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
