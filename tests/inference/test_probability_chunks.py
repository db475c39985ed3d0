"""Probabilities written to disk slab by slab: equal to the in-memory path, and never all held in memory."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from torch import nn

from medseg.core.config import ExperimentConfig
from medseg.core.errors import ConfigError
from medseg.inference import Predictor
from medseg.inference.gridmap import GridMap, LabelSink, ProbabilityFiles, ProbabilityOutput
from medseg.models import ModelCard
from tests.helpers import run_cli


class _Net(nn.Module):
    """A small smooth network with ``classes`` outputs (card: 1 mm target spacing, so inputs are resampled)."""

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.card = ModelCard(
            name="probe",
            task="segmentation",
            spatial_dims=3,
            in_channels=1,
            out_channels=classes,
            roi_size=(16, 16, 16),
            divisible_by=(1, 1, 1),
            target_spacing=(1.0, 1.0, 1.0),
            intensity_preset="mri",
            label_names=tuple(f"class {i}" for i in range(classes)),
        )
        self.net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.Tanh(), nn.Conv3d(6, classes, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 3 * self.net(x)


def _image() -> MetaTensor:
    rng = np.random.default_rng(0)
    volume = np.zeros((30, 26, 14), dtype=np.float32)
    volume[4:26, 3:22, 2:12] = rng.normal(1.0, 0.5, size=(22, 19, 10))  # a foreground box inside zeros
    affine = torch.tensor([[-0.8, 0, 0, 10.0], [0, 1.3, 0, -5.0], [0, 0, 2.0, 3.0], [0, 0, 0, 1]])
    return MetaTensor(torch.from_numpy(volume)[None], affine=affine)


def _predictor(classes: int = 4) -> Predictor:
    config = ExperimentConfig().updated({"data": {"spacing": [1.0, 1.0, 1.0]}, "infer": {"sw_batch_size": 1}})
    return Predictor(_Net(classes), config, device="cpu")


@pytest.mark.parametrize("dtype", ["uint8", "float16"])
def test_files_equal_the_in_memory_probabilities(dtype: str, tmp_path: Path) -> None:
    predictor = _predictor()
    image = _image()
    memory = predictor.predict(image, keep_probabilities=True)
    assert memory.probabilities is not None
    reference = memory.probabilities.float().numpy()
    output = ProbabilityOutput(tmp_path / "case_prob", dtype)  # type: ignore[arg-type]
    streamed = predictor.predict(image, probabilities_out=output)
    assert streamed.probabilities is None and torch.equal(streamed.mask, memory.mask)
    meta = json.loads((tmp_path / "case_prob.json").read_text())
    assert meta["dtype"] == dtype and meta["shape"] == list(image.shape[1:])
    np.testing.assert_allclose(np.asarray(meta["affine"]), image.affine.numpy(), atol=1e-6)
    assert len(meta["files"]) == 4
    for c, name in enumerate(predictor.label_names):
        path = tmp_path / meta["files"][name]
        if dtype == "uint8":
            nifti = nib.load(path)
            assert nifti.get_data_dtype() == np.uint8 and nifti.shape == tuple(image.shape[1:])
            np.testing.assert_allclose(nifti.affine, image.affine.numpy(), atol=1e-5)
            values = nifti.get_fdata()  # the header's slope 1/255 gives p back
            # round(p * 255) of the float32 p; the reference is p in float16 (error <= 2^-11)
            assert np.abs(values - reference[c]).max() <= 0.5 / 255 + 2**-11
        else:
            values = np.load(path)
            assert values.dtype == np.float16 and values.flags.f_contiguous
            assert np.array_equal(values, memory.probabilities[c].numpy())  # same float16 values, bit for bit
    outside = tmp_path / meta["files"][predictor.label_names[0]]
    background = nib.load(outside).get_fdata()[0, 0, 0] if dtype == "uint8" else np.load(outside)[0, 0, 0]
    assert float(background) == pytest.approx(1.0)  # outside the foreground box: background with p = 1


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def test_the_sink_never_holds_every_class_of_the_volume(tmp_path: Path) -> None:
    """16 classes on 128 x 128 x 256: 256 MiB in float32 (128 MiB in float16); the peak grows by less than 86 MiB."""
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident size (VmHWM) to the current one
    except OSError:
        pytest.skip("this kernel cannot reset the peak resident size")
    classes, shape = 16, (128, 128, 256)
    whole = classes * int(np.prod(shape)) * 4
    files = ProbabilityFiles(
        ProbabilityOutput(tmp_path / "big", "uint8"), shape, np.eye(4), [f"c{i}" for i in range(classes)]
    )
    sink = LabelSink(GridMap.resize(shape, shape), classes, planes_per_step=4, probability_files=files)
    before = _vm_kib("VmRSS")
    generator = torch.Generator().manual_seed(0)
    for start in range(0, shape[0], 4):  # the engine's chunks: 4 source planes of every class at a time
        logits = torch.randn(classes, 4, *shape[1:], generator=generator)
        logits[3] += 8.0 * (start % 16 < 8)  # class 3 wins in planes 0-7, 16-23, ...
        sink.consume(0, start, logits)
    labels = sink.finish()
    peak = _vm_kib("VmHWM")
    files.close()
    assert sink.probabilities is None
    # Kept in memory, the probabilities alone would be whole / 2 (float16); one step's temporaries are ~50 MiB.
    assert (peak - before) * 1024 < whole / 3, f"peak grew by {(peak - before) / 1024:.0f} MiB"
    p3 = nib.load(tmp_path / "big_3-c3.nii")
    assert p3.shape == shape
    column = np.asarray(p3.dataobj[:, 5, 7], dtype=np.float64)
    assert column[:8].mean() > 0.8 and column[8:16].mean() < 0.3 and labels[0, 5, 7] == 3
    total = sum(np.asarray(nib.load(files.paths[c]).dataobj[:, :, 100]) for c in range(classes))
    assert np.abs(total - 1).max() <= classes * 0.5 / 255 + 1e-6  # a distribution in every voxel


def test_probability_types_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="uint8 or float16"):
        ProbabilityOutput(tmp_path / "p", "float32")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="save_probabilities"):
        ExperimentConfig().updated({"infer": {"save_probabilities": "float64"}})


def test_cli_writes_probability_files(tiny_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    image = tiny_dataset / "imagesTr" / "case_00.nii.gz"
    args = ["predict", str(tiny_run), str(image), "--out", str(tmp_path), "--save-probabilities", "uint8"]
    code, out = run_cli(args, capsys, monkeypatch)
    assert code == 0, out
    stats = json.loads((tmp_path / "case_00_seg.json").read_text())
    meta = json.loads(Path(stats["probabilities"]).read_text())
    assert list(meta["files"]) == ["background", "sphere", "box"]
    mask = np.asarray(nib.load(tmp_path / "case_00_seg.nii.gz").dataobj)
    probs = np.stack([np.asarray(nib.load(tmp_path / f).dataobj) for f in meta["files"].values()])
    assert probs.shape[1:] == mask.shape
    assert (probs.argmax(0) == mask).mean() > 0.99  # argmax of the rounded probabilities: ties aside, the mask
    code, out = run_cli([*args[:-1], "float32"], capsys, monkeypatch)
    assert code != 0 and "float32" in out
