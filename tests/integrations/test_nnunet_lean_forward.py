"""The engine's memory-lean forward of nnU-Net's U-Nets: the same logits bit for bit, in less peak memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medseg.integrations.nnunet.shim import ensure_nnunet_importable

ensure_nnunet_importable()

from dynamic_network_architectures.architectures.unet import PlainConvUNet  # noqa: E402

from medseg.integrations.nnunet.engine import _FoldEnsemble, _lean_forward  # noqa: E402


def _unet(deep_supervision: bool = False, features: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return PlainConvUNet(
        1, 4, [features, 2 * features, 4 * features, 8 * features], nn.Conv3d, 3, [1, 2, 2, 2], 2, 3, [2, 2, 2],
        True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU, {"inplace": True},
        deep_supervision=deep_supervision,
    ).eval()  # fmt: skip


@pytest.mark.parametrize("autocast", [False, True])
def test_lean_forward_is_bit_identical(autocast: bool) -> None:
    net = _unet(features=8)
    x = torch.randn(2, 1, 32, 24, 40)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours, theirs = _lean_forward(net, x), net(x)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_other_networks_run_their_own_forward() -> None:
    plain = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1))
    supervised = _unet(deep_supervision=True, features=4)  # a list of outputs: not the lean path's
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.inference_mode():
        assert torch.equal(_lean_forward(plain, x), plain(x))
        assert isinstance(_lean_forward(supervised, x), list | tuple)
    ensemble = _FoldEnsemble([_unet(features=4), _unet(features=4)], None)
    ensemble.lean = False
    with torch.inference_mode():
        off = ensemble(x)
        ensemble.lean = True
        assert torch.equal(ensemble(x), off)


def _peak_delta_gib(fn) -> float:
    def vm(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
        raise RuntimeError(field)

    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand cached free memory back first, so both paths grow from the same base
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = vm("VmRSS")
    out = fn()
    peak = vm("VmHWM")
    del out
    return peak - before


def _measure_in_child(queue, lean: bool) -> None:  # a fresh process: no allocator state from other tests
    torch.set_num_threads(1)
    net = _unet(features=16)
    x = torch.randn(1, 1, 80, 80, 80)  # full-resolution feature maps of 16 x 80^3 float32 = 31 MiB
    run = (lambda: _lean_forward(net, x)) if lean else (lambda: net(x))
    with torch.inference_mode():
        run()  # warm up (oneDNN primitives, allocator)
        queue.put(min(_peak_delta_gib(run) for _ in range(2)))


def test_lean_forward_needs_less_peak_memory() -> None:
    import multiprocessing as mp

    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("this kernel cannot reset the peak resident size")
    ctx = mp.get_context("spawn")
    peaks = {}
    for lean in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure_in_child, args=(queue, lean))
        proc.start()
        peaks[lean] = queue.get(timeout=300)
        proc.join()
    plain, lean_peak = peaks[False], peaks[True]
    # 16 channels at 80^3: measured 0.229 vs 0.270 GiB (the saving grows with the maps: 1.25 vs 1.72 GiB at 128^3)
    assert lean_peak < 0.93 * plain, f"lean {lean_peak:.3f} GiB vs plain {plain:.3f} GiB"
