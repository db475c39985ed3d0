"""The sliding-window engine: nnU-Net's window grid and Gaussian, streaming in a slab, exact and resampled export."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import SpatialResample
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.cpu import CpuInfo, cpu_info
from medseg.core.errors import ConfigError
from medseg.inference import Predictor
from medseg.inference import backends as backends_module
from medseg.inference.backends import Backend, resolve_precision
from medseg.inference.engine import (
    EngineSettings,
    full_logits,
    importance_weights,
    mirror_subsets,
    stream_logits,
    window_starts,
)
from medseg.inference.gridmap import GridMap, LabelSink
from medseg.models import ModelCard


def _net(c_in: int = 2, c_out: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv3d(c_in, 8, 3, padding=1), nn.LeakyReLU(), nn.Conv3d(8, c_out, 3, padding=1)).eval()


def _reference(net: nn.Module, image: torch.Tensor, roi: tuple[int, ...], overlap: float, mirrors) -> torch.Tensor:
    """Every window at once: zero-pad to the window, weighted sum over the window grid, divide, crop back."""
    shape = image.shape[1:]
    pad = [max(r - s, 0) for s, r in zip(shape, roi, strict=True)]
    pads: list[int] = []
    for p in reversed(pad):
        pads += [p // 2, p - p // 2]
    x = torch.nn.functional.pad(image, pads)
    imp = importance_weights(roi, "gaussian")
    weight = imp[0][:, None, None] * imp[1][None, :, None] * imp[2][None, None, :]
    acc = torch.zeros(3, *x.shape[1:], dtype=torch.float64)
    wsum = torch.zeros(x.shape[1:], dtype=torch.float64)
    for pos in itertools.product(*[window_starts(s, r, overlap) for s, r in zip(x.shape[1:], roi, strict=True)]):
        sl = tuple(slice(p, p + r) for p, r in zip(pos, roi, strict=True))
        w = x[(slice(None), *sl)][None]
        with torch.no_grad():
            y = sum(torch.flip(net(torch.flip(w, [a + 2 for a in m])), [a + 2 for a in m]) for m in mirrors)
        acc[(slice(None), *sl)] += (y[0] / len(mirrors)).double() * weight
        wsum[sl] += weight
    out = acc / wsum
    return out[(slice(None), *(slice(p // 2, p // 2 + s) for p, s in zip(pad, shape, strict=True)))].float()


def test_window_grid_and_gaussian_are_nnunets() -> None:
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window

    for size, patch in [(197, 128), (233, 128), (110, 64), (64, 64), (300, 96)]:
        assert window_starts(size, patch, 0.5) == compute_steps_for_sliding_window((size,), (patch,), 0.5)[0]
    ref = compute_gaussian((24, 20, 16), 1.0 / 8, 1.0, dtype=torch.float64, device=torch.device("cpu"))
    ours = importance_weights((24, 20, 16), "gaussian")
    mine = ours[0][:, None, None] * ours[1][None, :, None] * ours[2][None, None, :]
    torch.testing.assert_close(mine.double() / mine.max(), ref / ref.max(), atol=1e-6, rtol=1e-5)
    assert window_starts(9, 1, 0.5) == list(range(9))  # 2D networks over the slices of a volume


@pytest.mark.parametrize("shape", [(37, 50, 29), (12, 40, 21)])  # the second is smaller than the window on 2 axes
def test_streamed_logits_equal_the_dense_reference(shape: tuple[int, int, int]) -> None:
    net = _net()
    image = torch.randn(2, *shape)
    roi = (16, 24, 32)
    mirrors = mirror_subsets((0, 2))
    settings = EngineSettings(roi, overlap=0.5, batch_size=3, mirrors=mirrors, accumulate="float32")
    torch.testing.assert_close(
        full_logits(net, image, settings), _reference(net, image, roi, 0.5, mirrors), atol=2e-5, rtol=1e-4
    )


def test_planes_are_released_before_the_last_window_runs() -> None:
    """The first finished planes come out after one row of windows: the buffer is a slab, not the image."""
    calls = []

    def forward(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.shape[0])
        return x[:, :1].repeat(1, 2, 1, 1, 1)

    image = torch.randn(1, 96, 40, 40)
    settings = EngineSettings((32, 32, 32), overlap=0.5, batch_size=1)
    stream = stream_logits(forward, image, settings)
    axis, start, first = next(stream)
    assert axis == 0 and start == 0 and first.shape == (2, 16, 40, 40)
    assert len(calls) == 4  # one row (2 x 2 windows) of the 5 x 2 x 2
    chunks = [first, *(c for _, _, c in stream)]
    assert len(calls) == 20 and sum(c.shape[1] for c in chunks) == 96
    assert max(c.shape[1] for c in chunks) <= 32


def test_labels_are_exact_under_permutation_flip_and_shift() -> None:
    net = _net()
    image = torch.randn(2, 30, 26, 18)
    settings = EngineSettings((16, 16, 16), accumulate="float32")
    logits = full_logits(net, image, settings)
    # output index (i, j, k) -> source (25 - j + 2, i - 3, k): a permutation, a flip and a shift
    out_affine = torch.tensor([[0.0, -1, 0, 27], [1, 0, 0, -3], [0, 0, 1, 0], [0, 0, 0, 1]])
    grid = GridMap.from_affines(torch.eye(4), (30, 26, 18), out_affine, (32, 28, 18))
    assert grid.exact
    sink = LabelSink(grid, 3)
    for chunk in stream_logits(net, image, settings):
        sink.consume(*chunk)
    labels = torch.from_numpy(sink.finish().astype(np.int64))
    expected = torch.zeros(32, 28, 18, dtype=torch.long)
    src = logits.argmax(0)
    for i, j in itertools.product(range(32), range(28)):
        a, b = 27 - j, i - 3
        if 0 <= a < 30 and 0 <= b < 26:
            expected[i, j] = src[a, b]
    assert torch.equal(labels, expected)


def test_resampled_labels_and_probabilities_follow_the_affine() -> None:
    net = _net()
    image = torch.randn(2, 20, 22, 18)
    settings = EngineSettings((16, 16, 16), accumulate="float32")
    logits = full_logits(net, image, settings)
    out_affine = torch.diag(torch.tensor([0.6, 0.5, 1.5, 1.0]))
    out_affine[:3, 3] = torch.tensor([0.3, -0.2, 0.4])
    out_shape = (33, 44, 12)
    sink = LabelSink(
        GridMap.from_affines(torch.eye(4), image.shape[1:], out_affine, out_shape), 3, keep_probabilities=True
    )
    for chunk in stream_logits(net, image, settings):
        sink.consume(*chunk)
    labels = sink.finish()
    resampler = SpatialResample(mode="bilinear", padding_mode="border", dtype=torch.float64)
    ref = torch.as_tensor(
        resampler(
            MetaTensor(logits.double(), affine=torch.eye(4)), dst_affine=out_affine.double(), spatial_size=out_shape
        )
    )
    inside = ref.abs().sum(0) > 0  # MONAI pads outside; compare where the source covers the output
    agree = (torch.from_numpy(labels.astype(np.int64)) == ref.argmax(0))[inside].float().mean()
    assert agree >= 0.999
    assert sink.probabilities is not None
    torch.testing.assert_close(
        sink.probabilities.float()[:, inside], torch.softmax(ref.float(), 0)[:, inside], atol=2e-3, rtol=0
    )


def test_resize_map_matches_scikit_image() -> None:
    from skimage.transform import resize

    rng = np.random.default_rng(0)
    source = rng.normal(size=(3, 11, 17, 8)).astype(np.float32)
    sink = LabelSink(
        GridMap.resize((11, 17, 8), (20, 9, 8), offset=(2, 1, 0), full_shape=(25, 12, 8)), 3, keep_probabilities=True
    )
    sink.consume(0, 0, torch.from_numpy(source[:, :5]))
    sink.consume(0, 5, torch.from_numpy(source[:, 5:]))
    labels = sink.finish()
    ref = np.stack([resize(c, (20, 9, 8), order=1, mode="edge", anti_aliasing=False) for c in source])
    assert np.array_equal(labels[2:22, 1:10], ref.argmax(0)) and labels[:2].max() == 0 and labels[22:].max() == 0
    assert sink.probabilities is not None and torch.all(sink.probabilities[0, :2] == 1)


class _Blob(nn.Module):
    """Logits (0.5, x): label 1 where the CT-window-scaled intensity exceeds 0.5; counts its windows."""

    def __init__(self) -> None:
        super().__init__()
        self.card = ModelCard(
            name="blob",
            task="segmentation",
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            roi_size=(16, 16, 16),
            divisible_by=(1, 1, 1),
            target_spacing=None,
            intensity_preset="mri",
            label_names=("background", "object"),
        )
        self.windows = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.windows += x.shape[0]
        return torch.cat([torch.full_like(x, 0.5), x], dim=1)


def _config(crop: bool) -> ExperimentConfig:
    return ExperimentConfig().updated(
        {"data": {"preset": "ct", "ct_window": [0.0, 1.0]}, "infer": {"crop_foreground": crop, "sw_batch_size": 1}}
    )


def test_foreground_crop_runs_fewer_windows_and_pastes_the_mask_back() -> None:
    volume = np.full((64, 60, 40), -1000.0, dtype=np.float32)  # air: below the CT presets' floor (-500 HU)
    volume[20:34, 25:41, 10:30] = 0.2  # foreground box
    volume[24:30, 30:36, 15:25] = 1.0  # the object inside it
    affine = torch.diag(torch.tensor([-1.0, 1.2, 2.0, 1.0]))
    image = MetaTensor(torch.from_numpy(volume)[None], affine=affine)
    full, cropped = _Blob(), _Blob()
    a = Predictor(full, _config(False), device="cpu").predict(image)
    b = Predictor(cropped, _config(True), device="cpu").predict(image)
    assert torch.equal(a.mask, b.mask) and int(b.mask.sum()) == 6 * 6 * 10
    assert cropped.windows < full.windows / 4
    empty = _Blob()
    air = MetaTensor(torch.full((1, 20, 20, 20), -1000.0), affine=affine)
    blank = Predictor(empty, _config(True), device="cpu").predict(air)
    assert empty.windows == 0 and int(blank.mask.sum()) == 0


def test_precision_choice_is_checked_against_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    plain_cpu = CpuInfo(model="test CPU", logical=2, physical=2, mhz=2000.0, flags=frozenset({"avx2", "fma"}))
    monkeypatch.setattr(backends_module, "cpu_info", lambda: plain_cpu)
    with pytest.raises(ConfigError, match="no native bf16"):
        resolve_precision("bf16", cpu)
    with pytest.raises(ConfigError, match="CUDA only"):
        resolve_precision("fp16", cpu)
    assert plain_cpu.peak_gflops() == pytest.approx(2 * 2.0 * 8 * 4)


def test_cpu_info_reads_this_machine() -> None:
    info = cpu_info()
    assert info.physical >= 1 and info.logical >= info.physical
    assert info.simd in ("avx512", "avx2", "sse", "other") and info.model in info.describe()


@pytest.mark.skipif(not cpu_info().native_bf16, reason="this CPU has no native bf16")
def test_bf16_autocast_stays_close_to_fp32() -> None:
    net = _net()
    x = torch.randn(1, 2, 16, 16, 16)
    fp32 = Backend(net, torch.device("cpu"), precision="fp32")(x)
    bf16 = Backend(net, torch.device("cpu"), precision="bf16")(x)
    assert bf16.dtype == torch.float32
    assert float((fp32 - bf16).abs().max()) < 0.05 * float(fp32.abs().max())


def test_openvino_backend_matches_torch_and_caches_its_model(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    net = _net(1, 2)
    window = (1, 1, 16, 16, 16)
    image = torch.randn(1, 24, 20, 30)
    settings = EngineSettings((16, 16, 16), accumulate="float32")
    torch_logits = full_logits(Backend(net, torch.device("cpu")), image, settings)
    ov = Backend(net, torch.device("cpu"), backend="openvino", window=window, cache_dir=tmp_path)
    ov_logits = full_logits(ov, image, settings)
    assert float((torch_logits - ov_logits).abs().max()) < 1e-4
    assert torch.equal(torch_logits.argmax(0), ov_logits.argmax(0))
    assert len(list(tmp_path.glob("openvino-*.xml"))) == 1 and len(list(tmp_path.glob("openvino-*.bin"))) == 1
    again = Backend(net, torch.device("cpu"), backend="openvino", window=window, cache_dir=tmp_path)
    torch.testing.assert_close(full_logits(again, image, settings), ov_logits)
    with pytest.raises(ConfigError, match="window shape"):
        Backend(net, torch.device("cpu"), backend="openvino")


@pytest.mark.skipif(not cpu_info().native_bf16, reason="this CPU has no native bf16")
def test_openvino_bf16_stays_close_to_fp32_and_shares_the_cached_model(tmp_path: Path) -> None:
    pytest.importorskip("openvino")
    net = _net(1, 2)
    window = (1, 1, 16, 16, 16)
    x = torch.randn(*window)
    fp32 = Backend(net, torch.device("cpu"), backend="openvino", window=window, cache_dir=tmp_path)
    bf16 = Backend(net, torch.device("cpu"), backend="openvino", precision="bf16", window=window, cache_dir=tmp_path)
    assert bf16.choice.precision == "bf16" and bf16.choice.backend == "openvino"
    a, b = fp32(x), bf16(x)
    assert b.dtype == torch.float32 and b.shape == a.shape
    diff = float((a - b).abs().max())
    assert 0 < diff < 0.05 * float(a.abs().max())  # bf16 really runs (not identical), and stays close
    assert len(list(tmp_path.glob("openvino-*.xml"))) == 1  # one float32 IR for both precisions


def test_openvino_bf16_is_refused_without_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    plain_cpu = CpuInfo(model="test CPU", logical=2, physical=2, mhz=2000.0, flags=frozenset({"avx2", "fma"}))
    monkeypatch.setattr(backends_module, "cpu_info", lambda: plain_cpu)
    with pytest.raises(ConfigError, match="no native bf16"):
        Backend(_net(1, 2), torch.device("cpu"), backend="openvino", precision="bf16", window=(1, 1, 8, 8, 8))
